"""SimMIM (microsoft/SimMIM): parameter counts of the official models, equivalence of encoder, head and loss with the
official math (models/vision_transformer.py, models/simmim.py, data/data_simmim.py written out below), and the mask
token's behaviour (masked pixels never reach the encoder) for the ViT and Swin encoders."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.models.eva import EvaBlock

from conftest import compose_config
from mimlab.losses import MaskedL1
from mimlab.masking import RandomMasking, upsample_mask
from mimlab.models.backbones.mask_token_vit import MaskTokenViT
from mimlab.models.backbones.swin import MaskTokenSwin
from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.heads.simmim_decoder import SimMIMDecoder
from mimlab.targets.pixels import NormPixTarget

BEIT_BLOCK = partial(EvaBlock, qkv_bias=True, qkv_fused=True, init_values=0.1)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "experiment,total,encoder,decoder",
    [
        # counted from the official build_simmim(config) models of microsoft/SimMIM with the pre-training configs:
        # ViT-B: patch embed 590,592 + cls 768 + shared rel-pos table (27*27+3)*12 = 8,784 + 12 blocks x 7,088,640
        # (q/v biases, gamma_1/gamma_2) + norm 1,536 + mask token 768; head Conv2d(768, 16*16*3, 1) = 590,592.
        ("simmim_vit_b", 86_256_720, 85_666_128, 590_592),
        # Swin-B @192, window 6: encoder 86,725,176 + mask token 128; head Conv2d(1024, 32*32*3, 1) = 3,148,800.
        ("simmim_swin_b", 89_874_104, 86_725_304, 3_148_800),
    ],
)
def test_parameter_counts_match_the_official_models(experiment, total, encoder, decoder, tmp_path):
    cfg = compose_config([f"experiment={experiment}", "logger=csv"], tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    assert (count(module), count(module.backbone), count(module.decoder)) == (total, encoder, decoder)


def official_rel_pos_index(gh: int, gw: int) -> torch.Tensor:
    """BEiT/SimMIM ``RelativePositionBias.relative_position_index`` (1+L, 1+L): patch pairs by (dy, dx), then the three
    extra entries cls->patch, patch->cls, cls->cls at the end of the table."""
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    dy, dx = rel[..., 0] + gh - 1, rel[..., 1] + gw - 1
    n = (2 * gh - 1) * (2 * gw - 1)
    index = torch.zeros(gh * gw + 1, gh * gw + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * gw - 1) + dx
    index[0, :], index[:, 0], index[0, 0] = n, n + 1, n + 2
    return index


def official_simmim_vit(m: MaskTokenViT, x: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """``VisionTransformerForSimMIM.forward`` with the ViT-B pre-training options: mask token mixed into the patch
    embeddings, cls prepended, no absolute pos-embed, shared relative bias, BEiT blocks (q/v bias, layer scale), norm."""
    n, _, h, w = x.shape
    gh, gw = h // m.patch_size, w // m.patch_size
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    wgt = patch_mask.reshape(n, -1, 1).float()
    t = torch.cat([m.cls_token.expand(n, -1, -1), t * (1 - wgt) + m.mask_token * wgt], 1)
    bias = m.rel_pos_bias.relative_position_bias_table[official_rel_pos_index(gh, gw)].permute(2, 0, 1)
    for blk in m.blocks:
        a = blk.attn
        heads = bias.shape[0]
        qkv_bias = torch.cat([a.q_bias, torch.zeros_like(a.v_bias), a.v_bias])
        q, k, v = (
            F.linear(blk.norm1(t), a.qkv.weight, qkv_bias).reshape(n, t.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        )
        attn = (q * q.shape[-1] ** -0.5 @ k.transpose(-2, -1) + bias).softmax(-1)
        t = t + blk.gamma_1 * a.proj((attn @ v).transpose(1, 2).reshape(n, t.shape[1], -1))
        t = t + blk.gamma_2 * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
    t = m.norm(t)[:, 1:]
    return t.transpose(1, 2).reshape(n, -1, gh, gw)


def official_simmim_loss(x, z, conv, stride, patch_mask, patch_size):
    """``SimMIM.forward``: 1x1 conv + pixel shuffle, L1 on masked pixels / (count + 1e-5) / in_chans."""
    x_rec = F.pixel_shuffle(F.conv2d(z, conv.weight, conv.bias), stride)
    m = patch_mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).float()
    return (F.l1_loss(x, x_rec, reduction="none") * m).sum() / (m.sum() + 1e-5) / x.shape[1]


def tiny_beit(**kw) -> MaskTokenViT:
    torch.manual_seed(0)
    model = MaskTokenViT(
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        abs_pos_embed=False,
        rel_pos_bias=True,
        block=BEIT_BLOCK,
        **kw,
    ).eval()
    with torch.no_grad():  # every parameter random, so the bias table, layer scales and q/v biases all matter
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_encoder_head_and_loss_match_the_official_math():
    model, decoder = tiny_beit(), SimMIMDecoder(32, encoder_stride=8, unit_size=16)
    masking = RandomMasking(0.6, unit_size=16)
    unit_mask = masking(3, masking.grid((64, 64)), torch.Generator().manual_seed(1))
    patch_mask = upsample_mask(unit_mask, (4, 4), 2).reshape(3, 8, 8)  # data_simmim.MaskGenerator: units -> patches
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        encoding = model(x, unit_mask)
        z = encoding.map
        z_ref = official_simmim_vit(model, x, patch_mask)
        loss = MaskedL1()(decoder(encoding), NormPixTarget(16, norm_pix=False)(x), unit_mask)["loss"]
        loss_ref = official_simmim_loss(x, z_ref, decoder.decoder[0], 8, patch_mask, 8)
    assert z.shape == (3, 32, 8, 8)
    assert (z - z_ref).abs().max() < 1e-5
    assert abs(loss - loss_ref) < 1e-6 * loss_ref


@pytest.mark.parametrize("img,units", [(224, 49), (192, 36)])
def test_mask_count_is_the_official_ceil_of_ratio_times_units(img, units):
    masking = RandomMasking(0.6, unit_size=32)
    mask = masking(4, masking.grid((img, img)), torch.Generator().manual_seed(0))
    assert mask.shape == (4, units) and torch.all(mask.sum(1) == math.ceil(units * 0.6))


def _perturb_unit(x: torch.Tensor, unit: int, index: int, grid_w: int) -> torch.Tensor:
    y = x.clone()
    r, c = divmod(index, grid_w)
    y[:, :, r * unit : (r + 1) * unit, c * unit : (c + 1) * unit] += torch.randn_like(y[:, :, :unit, :unit])
    return y


@pytest.mark.parametrize("encoder", ["beit_vit", "swin"])
def test_masked_pixels_never_reach_the_encoder(encoder):
    torch.manual_seed(0)
    model = (
        tiny_beit()
        if encoder == "beit_vit"
        else MaskTokenSwin(
            img_size=64, patch_size=4, window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)
        ).eval()
    )
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0] * 4])  # 4x4 units of 16 px
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x, mask).map
        assert torch.allclose(model(_perturb_unit(x, 16, 0, 4), mask).map, out, atol=1e-6)  # unit 0 masked
        assert not torch.allclose(model(_perturb_unit(x, 16, 1, 4), mask).map, out, atol=1e-3)  # unit 1 visible
        assert not torch.allclose(model(x).map, out, atol=1e-3)  # without a mask every patch is seen


def test_dropped_tokens_get_the_relative_bias_of_their_own_positions():
    """MAE-style dropping with a shared relative bias: the bias of the kept tokens is the full bias at their indices."""
    model = MaskedViT(
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        abs_pos_embed=False,
        rel_pos_bias=True,
        block=BEIT_BLOCK,
    )
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
    keep = torch.tensor([[0, 5, 6, 15], [1, 2, 9, 12]])
    full = model._attn_bias(torch.zeros(1))[0]
    kept = model._attn_bias(torch.zeros(1), keep)
    for n in range(2):
        idx = torch.cat([torch.zeros(1, dtype=torch.long), keep[n] + 1])
        assert torch.equal(kept[n], full[:, idx][:, :, idx])


def test_relative_bias_refuses_another_image_size():
    model = MaskTokenViT(
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        abs_pos_embed=False,
        rel_pos_bias=True,
        block=BEIT_BLOCK,
    )
    with pytest.raises(ValueError, match="model.backbone.img_size"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 16))


@pytest.mark.parametrize(
    "experiment,skip,keywords",
    [
        (
            "simmim_vit_b",
            {"cls_token", "pos_embed"},
            set(),
        ),  # VisionTransformer.no_weight_decay(); the mask token decays
        ("simmim_swin_b", {"absolute_pos_embed", "mask_token"}, {"relative_position_bias_table"}),
    ],
)
def test_weight_decay_groups_follow_the_official_pretrain_optimizer(experiment, skip, keywords, tmp_path):
    """SimMIM optimizer.get_pretrain_param_groups: no decay for 1-D params, biases, the encoder's no_weight_decay()
    names and its no_weight_decay_keywords()."""
    cfg = compose_config([f"experiment={experiment}", "logger=csv"], tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    factory = instantiate(cfg.optim)
    ids = {id(p): n for n, p in module.named_parameters()}
    no_decay = {ids[id(p)] for g in factory.param_groups(module, 0.05) if g["weight_decay"] == 0.0 for p in g["params"]}
    official = {
        n
        for n, p in module.named_parameters()
        if p.ndim == 1 or n.endswith(".bias") or n.removeprefix("backbone.") in skip or any(k in n for k in keywords)
    }
    assert no_decay == official
    assert ("backbone.mask_token" in no_decay) == (experiment == "simmim_swin_b")


@pytest.mark.parametrize("experiment", ["simmim_vit_b", "simmim_swin_b"])
def test_recipe_crops_like_data_simmim(experiment, tmp_path):
    """SimMIMTransform: RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3, torchvision's default bilinear) + flip."""
    cfg = compose_config([f"experiment={experiment}", "logger=csv"], tmp_path)
    crop = instantiate(cfg.data.train_transform).transforms[0]
    assert (crop.size, crop.scale, crop.interpolation.value) == ((cfg.data.img_size,) * 2, (0.67, 1.0), "bilinear")
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))


def test_beit_init_truncates_at_one_std_and_rescales_by_depth():
    from mimlab.models.backbones.vit import beit_init

    torch.manual_seed(0)
    model = MaskTokenViT(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=3,
        num_heads=2,
        abs_pos_embed=False,
        rel_pos_bias=True,
        block=BEIT_BLOCK,
        weight_init=beit_init,
    )
    assert model.patch_embed.proj.weight.abs().max() <= 0.02 and model.cls_token.abs().max() <= 0.02
    for i, blk in enumerate(model.blocks):
        bound = 0.02 / math.sqrt(2 * (i + 1))
        assert 0.02 * 0.95 < blk.attn.qkv.weight.abs().max() <= 0.02
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert 0.95 * bound < w.abs().max() <= bound
        assert not blk.mlp.fc1.bias.any() and torch.all(blk.gamma_1 == 0.1)
    assert not model.rel_pos_bias.relative_position_bias_table.any()
