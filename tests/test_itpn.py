"""iTPN pyramid + decoders: sizes (docs/methods.md §7 rows 34-35), pyramid strides/channels, tiny pre-training runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mimlab.losses import MaskedMSE
from mimlab.losses.multi_term import MaskedSmoothL1, WeightedLossSum
from mimlab.masking import RandomMasking
from mimlab.masking.blockwise import BlockMasking
from mimlab.models.backbones.hivit import HiViT, map_to_units, units_to_map
from mimlab.models.heads.itpn_clip_head import ITPNClipHead
from mimlab.models.heads.itpn_mfm_decoder import ITPNMFMDecoder
from mimlab.models.heads.itpn_pixel_decoder import ITPNPixelDecoder
from mimlab.models.necks.itpn_pyramid import ITPNPyramid
from mimlab.targets import NormPixTarget
from mimlab.targets.clip_teacher import ClipTeacherTarget
from mimlab.targets.ema_teacher import EMATeacherTarget


def count(*modules: nn.Module) -> float:
    return sum(p.numel() for m in modules for p in m.parameters()) / 1e6


def test_itpn_base_pixel_pretrain_model_size():
    with torch.device("meta"):
        backbone = HiViT(embed_dim=512, mlp_depth=3, depth=24, num_heads=8, rpe=False)
        neck = ITPNPyramid([128, 256, 512], fpn_dim=256, fpn_depth=2)
        decoder = ITPNPixelDecoder(fpn_dim=256, embed_dim=512, depth=8, num_heads=16)
    assert count(backbone, neck) == pytest.approx(82.604, abs=5e-4)
    assert count(decoder) == pytest.approx(25.889, abs=5e-4)
    assert count(backbone, neck, decoder) == pytest.approx(108.49, abs=5e-3)  # row 35


def test_itpn_large_encoder_plus_pyramid_size():
    with torch.device("meta"):
        backbone = HiViT(embed_dim=768, mlp_depth=2, depth=40, num_heads=12, rpe=False)
        neck = ITPNPyramid([192, 384, 768], fpn_dim=256, fpn_depth=2)
    assert count(backbone, neck) == pytest.approx(292.45, abs=5e-3)  # docs/methods.md §4.3


def tiny_backbone(**kw) -> HiViT:
    return HiViT(**{**dict(embed_dim=32, mlp_depth=1, depth=2, num_heads=2, img_size=64), **kw})


def test_pyramid_dense_contract_and_unit_layout_agree():
    torch.manual_seed(0)
    backbone, neck = tiny_backbone().eval(), ITPNPyramid([8, 16, 32], fpn_dim=16, fpn_depth=1).eval()
    x = torch.randn(2, 3, 64, 64)
    dense = neck(backbone.forward_features(x))
    assert neck.out_strides == [4, 8, 16] and neck.out_channels == [16, 16, 16]
    assert [tuple(m.shape) for m in dense] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4)]
    units = neck(backbone(x)).pyramid
    for d, u in zip(dense, units):
        torch.testing.assert_close(units_to_map(u, (4, 4)), d)
    torch.testing.assert_close(map_to_units(dense[0], 4), units[0])


def test_pyramid_split_is_a_2x2_pixel_shuffle():
    neck = ITPNPyramid([8, 16, 32], fpn_dim=4, fpn_depth=1)
    x = torch.randn(1, 1, 1, 1, 32)
    y = neck.split_16to8(x)  # (1, 1, 2, 2, 4)
    flat = neck.split_16to8.reduction(neck.split_16to8.norm(x)).reshape(2, 2, 4)  # (row, col, F)
    torch.testing.assert_close(y[0, 0], flat)


# ------------------------------------------------------------------------------------------ tiny pre-training runs
def run(parts: dict, masking, steps: int = 12, lr: float = 2e-3):
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    model = nn.ModuleDict(parts)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        mask = masking(4, (4, 4), generator=torch.Generator().manual_seed(step % 2))
        pred = model["decoder"](model["neck"](model["backbone"](images, mask)), mask)
        losses = model["loss"](pred, model["target"](images, mask), mask)
        for name, value in losses.items():
            assert torch.isfinite(value), f"{name} is not finite at step {step}"
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        model["target"].update(model["backbone"], step / steps)
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return history


def test_pixel_variant_loss_decreases():
    parts = dict(
        backbone=tiny_backbone(),
        neck=ITPNPyramid([8, 16, 32], 16, 2),
        decoder=ITPNPixelDecoder(16, 32, 1, 2, img_size=64),
        target=NormPixTarget(16),
        loss=MaskedMSE(),
    )
    hist = run(parts, RandomMasking(0.75, 16))
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_ema_variant_every_level_finite_and_total_decreases():
    torch.manual_seed(0)
    student = tiny_backbone()
    target = EMATeacherTarget(tiny_backbone(), pixel_target=NormPixTarget(16), stages=(0, 1, 2))
    target.update(student, 0.0)  # hard sync before the first step
    decoder = ITPNMFMDecoder(
        out_dims=[16 * 8, 4 * 16, 32],
        fpn_dim=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        img_size=64,
        pixel_decoder=ITPNPixelDecoder(16, 32, 1, 2, img_size=64),
    )
    loss = WeightedLossSum(
        {"pixels": MaskedMSE(), "s4": MaskedSmoothL1(), "s8": MaskedSmoothL1(), "s16": MaskedSmoothL1()}
    )
    parts = dict(backbone=student, neck=ITPNPyramid([8, 16, 32], 16, 2), decoder=decoder, target=target, loss=loss)
    hist = run(parts, RandomMasking(0.75, 16))
    assert set(hist[0]) == {"loss", "pixels", "s4", "s8", "s16"}
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert all(p.grad is None for p in target.teacher.parameters())


def tiny_clip_teacher(out_dim: int = 24) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=out_dim,
        pre_norm=True,
        global_pool="token",
    )


def test_clip_variant_both_terms_finite_and_total_decreases():
    torch.manual_seed(0)
    backbone = tiny_backbone(drop_masked=False, keep_hidden=(1,), rpe=True, init_values=0.1)
    head = ITPNClipHead(embed_dim=32, fpn_dim=16, teacher_dim=24, num_heads=2, aux_block=1, img_size=64)
    loss = WeightedLossSum({"pyramid": MaskedSmoothL1(masked_only=False), "aux": MaskedSmoothL1(masked_only=False)})
    parts = dict(
        backbone=backbone,
        neck=ITPNPyramid([8, 16, 32], 16, 1),
        decoder=head,
        target=ClipTeacherTarget(tiny_clip_teacher()),
        loss=loss,
    )
    hist = run(parts, BlockMasking(unit_size=16, num_masked=6, min_num_patches=2))
    assert set(hist[0]) == {"loss", "pyramid", "aux"}
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_heads_name_the_config_key_on_misuse():
    backbone, neck = tiny_backbone(), ITPNPyramid(embed_dim=32, fpn_dim=16, fpn_depth=1)
    head = ITPNClipHead(embed_dim=32, fpn_dim=16, teacher_dim=8, num_heads=2, aux_block=1, img_size=64)
    mask = torch.zeros(1, 16)
    mask[:, :8] = 1
    with pytest.raises(ValueError, match="drop_masked=false"):
        head(neck(backbone(torch.randn(1, 3, 64, 64), mask)))
    inpaint = tiny_backbone(drop_masked=False)
    with pytest.raises(KeyError, match=r"keep_hidden=\[1\]"):
        head(neck(inpaint(torch.randn(1, 3, 64, 64), mask)))
    with pytest.raises(ValueError, match="teacher_embed_dim"):
        ITPNMFMDecoder(fpn_dim=16)
    with pytest.raises(ValueError, match="exactly one"):
        ITPNPyramid()


def test_classification_head_for_fine_tuning():
    model = tiny_backbone(rpe=True, num_classes=5)
    assert model.forward_head(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_backbone().forward_head(torch.randn(1, 3, 64, 64))
