"""data2vec 2.0: each part against an independent re-derivation of the official fairseq math
(``examples/data2vec/models/data2vec2.py``, ``modalities/{base,images,modules}.py``, ``data/data_utils.py``
``compute_block_mask_2d``, the ``model`` criterion), multi-mask semantics, parameter counts of the ViT-B recipe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import SMALL_VIT, compose_config
from mimlab.losses.data2vec import Data2VecLoss
from mimlab.masking import MaskSet
from mimlab.masking.inverse_block import InverseBlockMasking
from mimlab.masking.multi_mask import MultiMask
from mimlab.models.backbones.vit import MaskedViT, trunc_normal_init
from mimlab.models.heads.data2vec_decoder import Data2VecDecoder
from mimlab.targets.data2vec import Data2VecTarget
from mimlab.targets.ema_teacher import LinearMomentum
from mimlab.tasks.pretrain import MaskedPretraining

D, HEADS, DEPTH, TOP_K = 32, 2, 3, 2


def tiny_vit(seed: int) -> MaskedViT:
    torch.manual_seed(seed)
    vit = MaskedViT(
        img_size=32,
        patch_size=8,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        post_norm=True,
        weight_init=trunc_normal_init,
    )
    with torch.no_grad():  # non-trivial LayerNorm affines, so a missing or misplaced norm cannot go unnoticed
        for name, p in vit.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vit


# ----------------------------------------------------------------------------------- references (official math)
def reference_inverse_block_mask(
    rows: int, side: int, mask_prob: float, length: int, adjust: float, g: torch.Generator
) -> torch.Tensor:
    """compute_block_mask_2d(inverse_mask=True, require_same_masks=True), written out with loops."""
    keep_prob = 1 - mask_prob
    units = side * side
    grid = torch.zeros(rows, side, side)
    centres = torch.randint(0, units, (rows, int(units * ((keep_prob + adjust) / length**2))), generator=g)
    for b in range(rows):
        for centre in centres[b].tolist():
            r, c = divmod(centre, side)
            for i in range(length):
                for j in range(length):
                    grid[b, min(max(r + i - length // 2, 0), side - 1), min(max(c + j - length // 2, 0), side - 1)] = 1
    keep = grid.reshape(rows, units)
    target = int(units * keep_prob)
    for b in range(rows):
        n = int(keep[b].sum())
        if n > target:
            keep[b, torch.multinomial(keep[b], n - target, replacement=False, generator=g)] = 0
        elif n < target:
            keep[b, torch.multinomial(1 - keep[b], target - n, replacement=False, generator=g)] = 1
    return 1 - keep


def reference_attention(attn, x):
    b, n, c = x.shape
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    a = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1, dtype=torch.float32)
    return F.linear((a @ v).transpose(1, 2).reshape(b, n, c), attn.proj.weight, attn.proj.bias)


def layer_norm(x, norm=None, eps=1e-5):
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + (norm.eps if norm else eps)
    )
    return y * norm.weight + norm.bias if norm is not None else y


def reference_alt_block(blk, x):
    """fairseq AltBlock(layer_norm_first=False, ffn_targets=True) -> (output, FFN output before the residual)."""
    x = x + reference_attention(blk.attn, x)
    r = x = layer_norm(x, blk.norm1)
    t = F.linear(F.gelu(F.linear(x, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return layer_norm(r + t, blk.norm2), t


def reference_encoder(vit, images, keep=None):
    """ImageEncoder + Data2VecMultiModel blocks: patch conv + fixed pos, keep the unmasked patches, prepend the extra
    token (no position), context-encoder LayerNorm, every block. Returns (output, [FFN outputs])."""
    pe = vit.patch_embed.proj
    x = F.conv2d(images, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
    if keep is not None:
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = layer_norm(torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], 1), vit.norm_pre)
    ffn = []
    for blk in vit.blocks:
        x, t = reference_alt_block(blk, x)
        ffn.append(t)
    return x, ffn


def reference_targets(teacher, images, top_k, clones):
    """make_targets: instance_norm_target_layer (over time, eps 1e-5) -> average -> layer_norm_targets; then clone."""
    _, ffn = reference_encoder(teacher, images)
    layers = [t[:, 1:] for t in ffn[-top_k:]]
    layers = [(t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + 1e-5) for t in layers]
    return layer_norm(sum(layers) / len(layers)).repeat_interleave(clones, 0)


def reference_decoder(dec, visible, mask, noise_std):
    """decoder_input (N(0, std) vectors at masked positions) + Decoder2d (conv, channel LayerNorm, GELU, residual) + proj."""
    rows, units = mask.shape
    side = math.isqrt(units)
    ids_restore = mask.argsort(dim=1, stable=True).argsort(dim=1)
    noise = visible.new_empty(rows, units - visible.shape[1], visible.shape[2]).normal_(0, noise_std)
    x = torch.gather(torch.cat([visible, noise], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, visible.shape[2]))
    x = x.transpose(1, 2).reshape(rows, -1, side, side)
    residual = x
    for layer in dec.blocks:
        conv = layer[0]
        x = F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)
        if conv.kernel_size[0] % 2 == 0:  # SamePad2d
            x = x[:, :, :-1, :-1]
        x = F.gelu(layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        if x.shape[1] == residual.shape[1]:
            x = x + residual
        residual = x
    return F.linear(x.reshape(rows, x.shape[1], units).transpose(1, 2), dec.proj.weight, dec.proj.bias)


def reference_loss(pred, cls, y, mask, cls_weight):
    """d2v_loss (MSE, scale 1/sqrt(D)) summed by the model criterion and divided by sample_size = #masked."""
    masked = mask.bool()
    sample_size = masked.sum()
    regression = (((pred[masked] - y[masked]) ** 2) / math.sqrt(y.shape[-1])).sum() / sample_size
    cls_term = (((cls - y.mean(1)) ** 2) / math.sqrt(y.shape[-1])).sum() * cls_weight * sample_size / sample_size
    return regression, cls_term


# ----------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inverse_block_mask_equals_official_algorithm(seed):
    ours = InverseBlockMasking(ratio=0.8, block_size=3, ratio_adjust=0.07, unit_size=16)
    mask = ours(16, (14, 14), generator=torch.Generator().manual_seed(seed))
    ref = reference_inverse_block_mask(16, 14, 0.8, 3, 0.07, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, ref)
    assert ((1 - mask).sum(1) == 39).all()  # 224 px / 16: int(196 * 0.2) visible, 157 masked


def test_inverse_block_visible_units_form_blocks():
    mask = InverseBlockMasking()(64, (14, 14), generator=torch.Generator().manual_seed(0)).reshape(64, 14, 14)
    visible = 1 - mask
    nb = torch.zeros_like(visible)
    nb[:, 1:] += visible[:, :-1]
    nb[:, :-1] += visible[:, 1:]
    nb[:, :, 1:] += visible[:, :, :-1]
    nb[:, :, :-1] += visible[:, :, 1:]
    # visible units with a visible 4-neighbour: ~0.9 for 3x3 blocks, ~0.6 for 39 uniformly random units of 196
    assert ((nb > 0) & (visible > 0)).sum() / visible.sum() > 0.8


def test_multi_mask_rows_belong_to_images_in_order():
    base = InverseBlockMasking(unit_size=8)
    masks = MultiMask(base, clones=4)(3, (4, 4), generator=torch.Generator().manual_seed(5))
    assert isinstance(masks, MaskSet) and masks.clones == 4 and masks.mask.shape == (12, 16)
    assert torch.equal(masks.mask, base(12, (4, 4), generator=torch.Generator().manual_seed(5)))


def test_multi_mask_with_one_generator_per_image_is_independent_of_the_batch():
    """Training hands one generator per image: an image's clones then do not depend on its batch neighbours."""
    multi = MultiMask(InverseBlockMasking(unit_size=8), clones=3)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    pair = multi.batch((4, 4), gens(10, 11))
    alone = multi.batch((4, 4), gens(11))
    assert pair.mask.shape == (6, 16) and torch.equal(pair.mask[3:], alone.mask)
    assert pair.clones == 3 and pair.visible == alone.visible == 3  # int(16 x 0.2) visible units, stated


def test_clones_encode_each_image_once_per_mask_row():
    vit, images = tiny_vit(0).eval(), torch.randn(2, 3, 32, 32)
    masks = MultiMask(InverseBlockMasking(ratio=0.5, unit_size=8), clones=3)(
        2, (4, 4), torch.Generator().manual_seed(0)
    )
    cloned = vit(images, masks)
    separate = vit(images.repeat_interleave(3, 0), masks.mask)
    torch.testing.assert_close(cloned.tokens, separate.tokens, rtol=0, atol=1e-6)
    assert cloned.tokens.shape == (6, 1 + 8, D)  # cls + visible only: masked patches never enter the encoder


# ----------------------------------------------------------------------------------- encoder, target, decoder, loss
def test_post_norm_encoder_equals_official_block_math():
    vit, images = tiny_vit(1).eval(), torch.randn(2, 3, 32, 32)
    mask = InverseBlockMasking(ratio=0.5, unit_size=8)(2, (4, 4), torch.Generator().manual_seed(1))
    keep = (1 - mask).nonzero()[:, 1].reshape(2, -1)
    ref, _ = reference_encoder(vit, images, keep)
    torch.testing.assert_close(vit(images, mask).tokens, ref, rtol=0, atol=2e-5)
    assert isinstance(vit.norm, torch.nn.Identity)  # post-LN: the last block's norm2 is the output norm


def test_target_equals_official_make_targets_and_is_shared_by_clones():
    teacher, images = tiny_vit(2), torch.randn(3, 3, 32, 32)
    target = Data2VecTarget(teacher, top_k=TOP_K)
    calls = []
    teacher.patch_embed.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    masks = MaskSet(torch.zeros(12, 16), clones=4)
    y = target(images, masks)
    assert calls == [3]  # one teacher pass over the 3 images serves all 12 mask rows
    torch.testing.assert_close(y, reference_targets(teacher, images, TOP_K, 4), rtol=0, atol=2e-5)


@pytest.mark.parametrize("kernel", [3, 4])
def test_decoder_equals_official_decoder2d(kernel):
    torch.manual_seed(3)
    dec = Data2VecDecoder(D, decoder_dim=32, depth=3, kernel_size=kernel, groups=4, mask_noise_std=0.01)
    vit, images = tiny_vit(3), torch.randn(2, 3, 32, 32)
    mask = InverseBlockMasking(ratio=0.5, unit_size=8)(2, (4, 4), torch.Generator().manual_seed(3))
    enc = vit(images, mask)
    torch.manual_seed(7)
    out = dec(enc, mask)
    torch.manual_seed(7)
    ref = reference_decoder(dec, enc.tokens[:, 1:], mask, 0.01)
    torch.testing.assert_close(out["tokens"], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["cls"], enc.tokens[:, 0])


def test_loss_equals_official_criterion_normalisation():
    torch.manual_seed(4)
    pred, cls, y = torch.randn(6, 16, D), torch.randn(6, D), torch.randn(6, 16, D)
    mask = InverseBlockMasking(ratio=0.75, unit_size=8)(6, (4, 4), torch.Generator().manual_seed(4))
    out = Data2VecLoss(cls_weight=0.01)({"tokens": pred, "cls": cls}, y, MaskSet(mask, clones=3))
    regression, cls_term = reference_loss(pred, cls, y, mask, 0.01)
    torch.testing.assert_close(out["loss_regression"], regression)
    torch.testing.assert_close(out["loss_cls"], cls_term)
    torch.testing.assert_close(out["loss"], regression + cls_term)
    torch.testing.assert_close(out["target_std"], torch.sqrt(y[mask.bool()].var(0) + 1e-6).mean())


def test_composed_step_equals_official_forward_end_to_end():
    """masking -> backbone -> decoder -> EMA target -> loss through MaskedPretraining vs the reference pipeline."""
    student, teacher = tiny_vit(5), tiny_vit(6)
    torch.manual_seed(5)
    decoder = Data2VecDecoder(D, decoder_dim=32, depth=2, kernel_size=3, groups=4)
    masking = MultiMask(InverseBlockMasking(ratio=0.75, unit_size=8), clones=3)
    module = MaskedPretraining(
        student, decoder, Data2VecTarget(teacher, top_k=TOP_K), Data2VecLoss(0.01), masking, optim=None
    )
    images = torch.randn(2, 3, 32, 32)
    masks = module.make_mask(images, 8)
    torch.manual_seed(9)
    pred, target = module(images, masks)
    losses = module.loss(pred, target, masks)

    keep = (1 - masks.mask).nonzero()[:, 1].reshape(6, -1)
    x, _ = reference_encoder(student, images.repeat_interleave(3, 0), keep)
    torch.manual_seed(9)
    ref_pred = reference_decoder(decoder, x[:, 1:], masks.mask, 0.01)
    y = reference_targets(teacher, images, TOP_K, 3)
    regression, cls_term = reference_loss(ref_pred, x[:, 0], y, masks.mask, 0.01)
    torch.testing.assert_close(losses["loss_regression"], regression, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_cls"], cls_term, rtol=1e-5, atol=1e-6)


def test_ema_update_follows_linear_momentum():
    schedule = LinearMomentum(0.9998, 0.99999, anneal_end=100_000 / 375_300)
    assert schedule(0.0) == 0.9998 and schedule(1.0) == 0.99999
    assert schedule(50_000 / 375_300) == pytest.approx((0.9998 + 0.99999) / 2)  # fairseq get_annealed_rate halfway
    student, target = tiny_vit(0), Data2VecTarget(tiny_vit(1), LinearMomentum(0.9, 0.99, 0.5), top_k=TOP_K)
    target.update(student, 0.0)  # first call: hard copy
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    target.update(student, 0.25)
    m = 0.9 + 0.09 * 0.5
    for name, t in target.teacher.state_dict().items():
        torch.testing.assert_close(t, m * s0[name] + (1 - m) * (s0[name] + 1.0))
    assert not any(p.requires_grad for p in target.teacher.parameters())


# ----------------------------------------------------------------------------------- recipe
def test_vit_b_recipe_parameter_counts(tmp_path):
    """fairseq Data2VecMultiModel (image, ViT-B): encoder 85.647 M trainable (+ fixed sin-cos positions), conv decoder
    2.586 M, EMA teacher = a full copy of the encoder (no decoder). Analytic counts from the official modules."""
    cfg = compose_config(["experiment=data2vec2_vit_b", "logger=csv"], tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    count = lambda m, trainable=False: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)
    block = (3 * 768 * 768 + 3 * 768) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768) + 4 * 768
    encoder = (768 * 3 * 16 * 16 + 768) + 768 + 2 * 768 + 12 * block  # patch conv, cls, embedding LN, blocks
    decoder = 6 * (768 * (768 // 16) * 3 * 3 + 768) + 768 * 768 + 768
    assert count(module.backbone, trainable=True) == encoder == 85_647_360
    assert count(module.backbone) - encoder == 197 * 768  # our sin-cos table has MAE's zero cls row (fairseq: 196)
    assert count(module.decoder) == decoder == 2_585_856
    assert count(module.target) == count(module.backbone)
    assert count(module, trainable=True) == 88_233_216
    assert cfg.masking.clones == 16 and cfg.target.top_k == 10 and cfg.loss.cls_weight == 0.01


@pytest.mark.slow
def test_loss_goes_down_on_a_fixed_batch(tmp_path):
    cfg = compose_config(
        [
            "experiment=data2vec2_vit_tiny_synthetic",
            "data.img_size=32",
            "masking.clones=2",
            *SMALL_VIT,
            "model.decoder.decoder_dim=64",
            "target.top_k=2",
        ],
        tmp_path,
    )
    torch.manual_seed(0)
    module = instantiate(cfg.task)
    module.target.sync_(module.backbone)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-3)
    images = torch.randn(8, 3, 32, 32)
    losses = []
    for step in range(25):
        out = module.compute_losses(images, module.make_mask(images, step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        module.target.update(module.backbone, step / 25)
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses  # measured: 0.80


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="masking.ratio"):
        InverseBlockMasking(ratio=1.0)
    with pytest.raises(ValueError, match=r"masking\.ratio=0\.8 over 1 mask unit\(s\) of 8 px keeps .* = 0 visible"):
        InverseBlockMasking(unit_size=8)(2, (1, 1))  # an 8-px image at patch 8
    with pytest.raises(ValueError, match="target.top_k"):
        Data2VecTarget(tiny_vit(0), top_k=4)
    with pytest.raises(ValueError, match="model.decoder.groups"):
        Data2VecDecoder(30, groups=16)
    with pytest.raises(ValueError, match="class_token"):
        Data2VecLoss(0.01)({"tokens": torch.zeros(1, 4, 8)}, torch.zeros(1, 4, 8), torch.ones(1, 4))


def test_teacher_panel_draws_the_ema_targets_once_per_image(tmp_path):
    from types import SimpleNamespace

    from mimlab.callbacks.target_maps import TeacherTargetPanel

    cfg = compose_config(["experiment=data2vec2_vit_tiny_synthetic", "data.img_size=32"], tmp_path)
    module = instantiate(cfg.task)
    seen = []
    module.target.register_forward_hook(lambda _m, _inp, out: seen.append(tuple(out.shape[:2])))
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(val_set=[(torch.randn(3, 32, 32), 0) for _ in range(4)]),
        default_root_dir=str(tmp_path),
        global_step=0,
        loggers=[],
    )
    path = TeacherTargetPanel(num_images=2).render(trainer, module)
    assert path is not None and seen == [(2, 16)]  # the recipe masks 4 clones; the panel asks for one row per image


def test_recipe_at_8px_is_refused_naming_the_sizes(tmp_path):
    """data2vec 2.0 at 8 px (one 8-px patch): the masker names the grid instead of a norm layer failing."""
    from mimlab.tasks.pretrain import CompositionError

    cfg = compose_config(["experiment=data2vec2_vit_tiny_synthetic", "data.img_size=8", "logger=csv"], tmp_path)
    module = instantiate(cfg.task)
    with pytest.raises(CompositionError, match=r"image size \(8, 8\).*1 mask unit\(s\) of 8 px keeps .* = 0 visible"):
        module.check_composition((8, 8))
