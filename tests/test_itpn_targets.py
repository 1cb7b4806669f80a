"""iTPN targets and losses: block masking, frozen CLIP teacher, EMA teacher math, two-term smooth-L1."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mimlab.losses.multi_term import MaskedSmoothL1, WeightedLossSum
from mimlab.masking.blockwise import BlockMasking
from mimlab.models.backbones.hivit import HiViT
from mimlab.targets.clip_teacher import ClipTeacherTarget
from mimlab.targets.ema_teacher import EMATeacherTarget, cosine_momentum


# ------------------------------------------------------------------------------------------------ block masking
def test_block_masking_exact_count_and_reproducible():
    masking = BlockMasking(unit_size=16, num_masked=75)
    a = masking(8, (14, 14), generator=torch.Generator().manual_seed(3))
    b = masking(8, (14, 14), generator=torch.Generator().manual_seed(3))
    assert a.shape == (8, 196) and torch.equal(a, b)
    assert (a.sum(1) == 75).all()
    assert set(a.unique().tolist()) <= {0.0, 1.0}


def test_block_masking_makes_blocks_not_scattered_units():
    masking = BlockMasking(unit_size=16, num_masked=75)
    mask = masking(16, (14, 14), generator=torch.Generator().manual_seed(0)).reshape(16, 14, 14)
    # masked units with a masked 4-neighbour: near 1 for blocks, about 0.4-0.6 for uniform random masking
    nb = torch.zeros_like(mask)
    nb[:, 1:] += mask[:, :-1]
    nb[:, :-1] += mask[:, 1:]
    nb[:, :, 1:] += mask[:, :, :-1]
    nb[:, :, :-1] += mask[:, :, 1:]
    frac = ((nb > 0) & (mask > 0)).sum() / mask.sum()
    assert frac > 0.9


def test_block_masking_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_masked"):
        BlockMasking(num_masked=300)(1, (14, 14))


# ------------------------------------------------------------------------------------------------ CLIP teacher
def tiny_teacher() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=24,
        pre_norm=True,
        global_pool="token",
    )


def test_clip_teacher_is_frozen_and_layer_normed():
    target = ClipTeacherTarget(tiny_teacher())
    target.train()
    assert not target.teacher.training
    assert all(not p.requires_grad for p in target.parameters())
    t = target(torch.randn(2, 3, 64, 64), torch.zeros(2, 16))
    assert t.shape == (2, 16, 24) and not t.requires_grad
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    x = torch.randn(2, 3, 64, 64)
    feats = target.teacher.head(target.teacher.forward_features(x * target.scale + target.shift)[:, 1:])
    ref = (feats - feats.mean(-1, keepdim=True)) / (feats.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(target(x), ref)  # LayerNorm without affine of the patch tokens after the projection


def test_clip_teacher_renormalises_student_images_to_clip_statistics():
    target = ClipTeacherTarget(tiny_teacher(), input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5))
    raw = torch.rand(1, 3, 64, 64)
    student_view = (raw - 0.5) / 0.5
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(student_view * target.scale + target.shift, (raw - clip_mean) / clip_std)


def test_clip_teacher_loads_local_file_and_reports_missing_path(tmp_path):
    source = tiny_teacher()
    path = tmp_path / "clip_visual.pt"
    torch.save(source.state_dict(), path)
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)  # different random weights: equal outputs below prove the file was loaded
    fresh = VisionTransformer(
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=24,
        pre_norm=True,
        global_pool="token",
    )
    target = ClipTeacherTarget(fresh, checkpoint_path=str(path))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(target(x), ClipTeacherTarget(source)(x))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ClipTeacherTarget(tiny_teacher(), checkpoint_path=str(tmp_path / "absent.pt"))


def test_two_term_smooth_l1_equals_official_sum():
    torch.manual_seed(0)
    a, b, t = torch.randn(2, 16, 8), torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    loss = WeightedLossSum({"pyramid": MaskedSmoothL1(masked_only=False), "aux": MaskedSmoothL1(masked_only=False)})
    out = loss({"pyramid": a, "aux": b}, t, torch.zeros(2, 16))
    ref = nn.SmoothL1Loss()(a, t) + nn.SmoothL1Loss()(b, t)
    torch.testing.assert_close(out["loss"], ref)


def test_masked_smooth_l1_only_counts_masked_units():
    pred, tgt = torch.zeros(1, 4, 2), torch.tensor([[[3.0, 3.0], [0.5, 0.5], [9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert MaskedSmoothL1()(pred, tgt, mask)["loss"].item() == pytest.approx((2.5 + 0.125) / 2)


def test_weighted_sum_rejects_unknown_weight_keys():
    with pytest.raises(ValueError, match="loss.weights"):
        WeightedLossSum({"a": MaskedSmoothL1()}, {"b": 1.0})


# ------------------------------------------------------------------------------------------------ EMA teacher
def tiny_backbone(seed: int) -> HiViT:
    torch.manual_seed(seed)
    return HiViT(embed_dim=32, mlp_depth=1, depth=1, num_heads=2, img_size=64)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.996, 1.0, 0.0) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 1.0, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 1.0, 0.5) == pytest.approx(0.998)
    assert cosine_momentum(0.9, 1.0, 0.25) == pytest.approx(1.0 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_ema_update_math_and_first_call_sync():
    student, target = tiny_backbone(0), EMATeacherTarget(tiny_backbone(1), momentum=0.9, final_momentum=1.0)
    target.update(student, 0.0)  # first call: hard copy
    for t, s in zip(target.teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    before = [t.clone() for t in target.teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    target.update(student, 0.25)
    m = cosine_momentum(0.9, 1.0, 0.25)
    assert target.current_momentum == pytest.approx(m)
    for t, t0, s in zip(target.teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s)


def test_ema_teacher_gets_no_gradient_and_sees_the_full_image():
    student, target = tiny_backbone(0), EMATeacherTarget(tiny_backbone(1), stages=(0, 1, 2))
    target.update(student, 0.0)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.ones(2, 16)
    mask[:, :4] = 0
    out = target(x, mask)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"s4": (2, 16, 128), "s8": (2, 16, 64), "s16": (2, 16, 32)}
    assert all(not v.requires_grad for v in out.values())
    assert all(not p.requires_grad for p in target.teacher.parameters())
    torch.testing.assert_close(out["s16"], target(x, torch.zeros(2, 16))["s16"])  # mask does not reach the teacher
    target.train()
    assert not target.teacher.training


def test_ema_rejects_bad_config():
    with pytest.raises(ValueError, match="target.stages"):
        EMATeacherTarget(tiny_backbone(0), stages=(0, 3, 2))
    with pytest.raises(ValueError, match="momentum"):
        EMATeacherTarget(tiny_backbone(0), momentum=1.2)


def test_sync_callback_copies_once_and_not_after_resume():
    from types import SimpleNamespace

    from mimlab.callbacks.ema_teacher_sync import EMATeacherSync

    student, target = tiny_backbone(0), EMATeacherTarget(tiny_backbone(1))
    module = SimpleNamespace(target=target, backbone=student)
    EMATeacherSync().on_train_start(None, module)
    w = next(target.teacher.parameters())
    torch.testing.assert_close(w, next(student.parameters()))
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    EMATeacherSync().on_train_start(None, module)  # e.g. after a resume: synced is restored, nothing is copied
    assert not torch.allclose(w, next(student.parameters()))
    with pytest.raises(TypeError, match="EMA-teacher target"):
        EMATeacherSync().on_train_start(None, SimpleNamespace(target=nn.Identity(), backbone=student))
