"""FrozenTeacher: frozen (no grads, eval kept, BN stats fixed), local checkpoints, grid alignment, state dict."""

import pytest
import timm
import torch
from torch import nn

from mimlab.targets.frozen_teacher import FrozenTeacher


def test_resnet_teacher_gives_stride32_grid_of_2048d_tokens():
    teacher = FrozenTeacher("resnet50", stride=32, dim=2048)
    out = teacher(torch.randn(1, 3, 64, 96), None)
    assert out.shape == (1, 2048, 2, 3) and teacher.dim == 2048
    assert not out.requires_grad


def test_vit_teacher_selectable_by_name():
    teacher = FrozenTeacher("vit_tiny_patch16_224", stride=16, model_kwargs={"img_size": 32})
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 192, 2, 2)  # prefix token dropped


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = FrozenTeacher("resnet18")
    parent = nn.ModuleDict({"target": teacher, "student": nn.Linear(2, 2)})
    parent.train()
    assert teacher.training and not teacher.teacher.training
    assert all(not m.training for m in teacher.teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.teacher.state_dict().items()}
    with torch.enable_grad():
        out = teacher(torch.randn(2, 3, 32, 32))
    assert not out.requires_grad and out.grad_fn is None
    after = teacher.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched too


def test_wrong_stride_or_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="target.stride=16"):
        FrozenTeacher("resnet18", stride=16)(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="target.dim=2048"):
        FrozenTeacher("resnet18", dim=2048)


def test_loads_dino_style_local_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=0)
    state = {"module.backbone." + k: v for k, v in source.state_dict().items()}
    state["module.head.mlp.0.weight"] = torch.randn(4, 4)  # DINO projection head: ignored
    torch.save({"teacher": state, "epoch": 3}, tmp_path / "dino.pth")
    torch.manual_seed(2)
    teacher = FrozenTeacher("resnet18", checkpoint=str(tmp_path / "dino.pth"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(teacher(x), source.eval().forward_features(x))


def test_checkpoint_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="target.checkpoint"):
        FrozenTeacher("resnet18", checkpoint=str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="lacks"):
        FrozenTeacher("resnet18", checkpoint=str(tmp_path / "partial.pth"))


def test_tokens_line_up_with_stride_sized_image_blocks():
    """Token r*w+c of a stride-32 teacher depends only on pixel block (r, c), i.e. on mask unit r*w+c."""
    teacher = FrozenTeacher(nn.Conv2d(3, 8, kernel_size=32, stride=32), stride=32)
    images = torch.randn(1, 3, 64, 96)
    base = teacher(images).flatten(2).transpose(1, 2)  # (1, 6, 8)
    for unit in range(6):
        r, c = divmod(unit, 3)
        changed = images.clone()
        changed[..., r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] += 1.0
        diff = (teacher(changed).flatten(2).transpose(1, 2) - base).abs().sum(-1)[0]
        assert (diff > 0).nonzero().flatten().tolist() == [unit]


def test_teacher_weights_stay_out_of_checkpoints_unless_asked():
    torch.manual_seed(0)
    model = nn.ModuleDict({"target": FrozenTeacher("resnet18"), "head": nn.Linear(2, 2)})
    state = model.state_dict()
    assert not any(k.startswith("target.") for k in state) and "head.weight" in state
    weights = {k: v.clone() for k, v in model["target"].teacher.state_dict().items()}
    assert not model.load_state_dict(state, strict=True).missing_keys  # teacher keeps its weights
    assert all(torch.equal(v, model["target"].teacher.state_dict()[k]) for k, v in weights.items())

    kept = nn.ModuleDict({"target": FrozenTeacher("resnet18", keep_in_checkpoint=True)})
    full = kept.state_dict()
    assert "target.teacher.conv1.weight" in full
    full["target.teacher.conv1.weight"] = torch.zeros_like(full["target.teacher.conv1.weight"])
    kept.load_state_dict(full)
    assert kept["target"].teacher.conv1.weight.abs().sum() == 0


def test_random_teacher_is_reproducible_whatever_the_global_rng():
    torch.manual_seed(1)
    a = FrozenTeacher("resnet18", init_seed=3)
    torch.manual_seed(2)
    b = FrozenTeacher("resnet18", init_seed=3)
    assert torch.equal(a.teacher.conv1.weight, b.teacher.conv1.weight)
    assert not torch.equal(a.teacher.conv1.weight, FrozenTeacher("resnet18", init_seed=4).teacher.conv1.weight)
