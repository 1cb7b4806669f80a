"""MaskFeat, image version (facebookresearch/SlowFast): parameter count of the official ViT-B model, HOG target and
prediction equivalent to the official math (slowfast/models/operators.py HOGLayerC, masked.py _get_hog_label_2d and
_maskfeat_forward, attention.py MultiScaleBlock without pooling, written out below), MSE as MultipleMSELoss, and the
block-wise masking counts."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import compose_config
from mimlab.losses import MaskedMSE
from mimlab.models.backbones.mask_token_vit import MaskTokenViT
from mimlab.models.heads.linear_token import LinearTokenHead
from mimlab.targets.hog import HOGTarget


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_matches_the_official_model(tmp_path):
    """Official MaskMViT (in1k_VIT_B_MaskFeat_PT): encoder without final norm 85,797,888 (patch embed 590,592, cls 768,
    pos-embed 197*768, 12 blocks x 7,087,872, mask token 768) + head LayerNorm 1,536 + Linear(768, 108) 83,052.
    Here the LayerNorm is the encoder's final norm, so the split differs and the total does not."""
    cfg = compose_config(["experiment=maskfeat_vit_b", "logger=csv"], tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    assert count(module) == 85_882_476
    assert (count(module.backbone), count(module.decoder)) == (85_797_888 + 1_536, 83_052)
    assert module.target.dim == 108


def official_hog(images: torch.Tensor, nbins: int = 9, pool: int = 8) -> torch.Tensor:
    """``HOGLayerC(nbins, pool)``: (N, 3, H, W) -> (N, 3, nbins, H/pool, W/pool)."""
    sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    x = F.pad(images, (1, 1, 1, 1), mode="reflect")
    gx = F.conv2d(x, sobel_x.expand(3, 1, 3, 3), groups=3)
    gy = F.conv2d(x, sobel_x.T.expand(3, 1, 3, 3), groups=3)
    magnitude = torch.stack([gx, gy], dim=-1).norm(dim=-1)
    phase = torch.atan2(gx, gy) / math.pi * nbins
    n, c, h, w = magnitude.shape
    out = torch.zeros(n, c, nbins, h, w)
    out.scatter_add_(2, phase.floor().long().view(n, c, 1, h, w) % nbins, magnitude.view(n, c, 1, h, w))
    out = out.unfold(3, pool, pool).unfold(4, pool, pool).sum(dim=[-1, -2])
    return F.normalize(out, p=2, dim=2)


def official_labels(images: torch.Tensor, feat_size: int) -> torch.Tensor:
    """``_get_hog_label_2d`` before selecting masked tokens: (N, L, 3 * nbins * cells), channel-bin-major."""
    hog = official_hog(images).flatten(1, 2)
    k = hog.shape[-1] // feat_size
    return hog.permute(0, 2, 3, 1).unfold(1, k, k).unfold(2, k, k).flatten(1, 2).flatten(2)


def test_hog_target_matches_the_official_labels():
    images = torch.randn(2, 3, 64, 64)
    ours = HOGTarget(patch_size=16, cell_size=8, nbins=9)(images)
    ref = official_labels(images, 4)
    assert ours.shape == ref.shape == (2, 16, 108)
    assert (ours - ref).abs().max() < 1e-5


def test_a_vertical_edge_fills_the_horizontal_gradient_bin_of_its_cells():
    """A left/right step has gx != 0, gy = 0: atan2(±gx, 0) = ±π/2 -> bin floor(±4.5) mod 9 = 4, in every channel."""
    images = torch.zeros(1, 3, 32, 32)
    images[..., 12:] = 1.0  # edge between columns 11 and 12: inside the second 8-px cell column
    hist = HOGTarget(patch_size=16, cell_size=8, nbins=9).cell_histograms(images)[0]  # (3, 9, 4, 4)
    assert torch.allclose(hist[:, 4, :, 1], torch.ones(3, 4))
    assert hist[:, :, :, 1].sum() == pytest.approx(12.0)
    assert hist[:, :, :, 3].abs().sum() == 0  # flat cells have no gradient


def official_maskfeat_prediction(m: MaskTokenViT, head: LinearTokenHead, x, mask):
    """``_maskfeat_forward`` (2-D, loader mask): mask token mixed into the patch embeddings, cls, learned pos-embed,
    MultiScaleBlocks without pooling (= pre-norm ViT blocks), MSSeparateHead (LayerNorm + Linear) on masked tokens."""
    n = x.shape[0]
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    w = mask.unsqueeze(-1)
    t = torch.cat([m.cls_token.expand(n, -1, -1), t * (1 - w) + m.mask_token * w], 1) + m.pos_embed
    for blk in m.blocks:
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(t)).reshape(n, t.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * q.shape[-1] ** -0.5 @ k.transpose(-2, -1)).softmax(-1)
        t = t + blk.attn.proj((attn @ v).transpose(1, 2).reshape(n, t.shape[1], -1))
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
    return head.proj(m.norm(t)[:, 1:][mask.bool()])


def test_prediction_and_loss_match_the_official_math():
    torch.manual_seed(0)
    model = MaskTokenViT(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, learnable_pos_embed=True
    ).eval()
    head = LinearTokenHead(32, 108)
    with torch.no_grad():
        for p in [*model.parameters(), *head.parameters()]:
            p.normal_(0, 0.3)
    x = torch.randn(3, 3, 64, 64)
    mask = (torch.rand(3, 16) < 0.4).float()
    with torch.no_grad():
        pred = head(model(x, mask))
        ref = official_maskfeat_prediction(model, head, x, mask)
        target = HOGTarget(16, 8, 9)(x)
        loss = MaskedMSE()(pred, target, mask)["loss"]
    assert (pred[mask.bool()] - ref).abs().max() < 1e-5
    assert abs(loss - F.mse_loss(ref, target[mask.bool()])) < 1e-6  # MultipleMSELoss: mean over masked tokens' values


def test_block_masking_masks_40_percent_in_blocks(tmp_path):
    """SlowFast Imagenet._prepare_im_masked: round(14*14*0.4) = 78 patches, blocks of at least 78 // 5 = 15."""
    cfg = compose_config(["experiment=maskfeat_vit_b", "logger=csv"], tmp_path)
    masking = instantiate(cfg.masking)
    assert masking.min_num_patches == 78 // 5
    mask = masking(8, masking.grid((224, 224)), torch.Generator().manual_seed(0))
    assert mask.shape == (8, 196) and torch.all(mask.sum(1) == 78)
    grid = mask.reshape(8, 14, 14)
    neighbours = (grid[:, 1:] * grid[:, :-1]).sum() + (grid[:, :, 1:] * grid[:, :, :-1]).sum()
    assert neighbours / (8 * 78) > 1.0  # blocks: a masked patch has masked neighbours (uniform masking: about 0.7)


def test_weight_decay_spares_only_1d_params_and_biases(tmp_path):
    """SlowFast construct_optimizer with ZERO_WD_1D_PARAM and ZERO_DECAY_POS_CLS: False: pos-embed, cls and mask token
    decay; only 1-D parameters and biases do not."""
    cfg = compose_config(["experiment=maskfeat_vit_b", "logger=csv"], tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    ids = {id(p): n for n, p in module.named_parameters()}
    groups = instantiate(cfg.optim).param_groups(module, 0.05)
    no_decay = {ids[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert no_decay == {n for n, p in module.named_parameters() if p.ndim == 1}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.mask_token"}.isdisjoint(no_decay)


def test_recipe_crops_like_the_official_config(tmp_path):
    """TRAIN_JITTER_SCALES_RELATIVE [0.5, 1.0], TRAIN_JITTER_ASPECT_RELATIVE [0.75, 1.3333], bicubic, no colour jitter."""
    cfg = compose_config(["experiment=maskfeat_vit_b", "logger=csv"], tmp_path)
    crop = instantiate(cfg.data.train_transform).transforms[0]
    assert (crop.size, crop.scale, crop.interpolation.value) == ((224, 224), (0.5, 1.0), "bicubic")
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))


def test_hog_is_computed_in_float32_under_autocast():
    images = torch.randn(2, 3, 32, 32)
    target = HOGTarget(patch_size=16, cell_size=8, nbins=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = target(images)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, target(images))
