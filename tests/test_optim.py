import math

import pytest
import torch
from torch import nn

from mimlab.models.backbones.vit import MaskedViT
from mimlab.optim import ParamGroups, WarmupCosine, WarmupMultiStep, WarmupPoly


def mae_lr(epoch: float, lr: float, min_lr: float, warmup: float, epochs: float) -> float:
    """facebookresearch/mae util/lr_sched.adjust_learning_rate, written out."""
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


@pytest.mark.parametrize("step", [0, 1, 37, 399, 400, 401, 1234, 3999])
def test_schedule_matches_mae_per_iteration_formula(step):
    sched = WarmupCosine(steps_per_epoch=100, epochs=40, warmup_epochs=4, min_lr_ratio=1e-6 / 1e-3)
    assert sched(step) * 1e-3 == pytest.approx(mae_lr(step / 100, 1e-3, 1e-6, 4, 40), rel=1e-9, abs=1e-15)


class _Task(nn.Module):
    """A task in miniature: a real backbone plus a head outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = MaskedViT(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2)
        self.head = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4))


def test_pretraining_groups_decay_only_2d_weights_like_mae_add_weight_decay():
    task = _Task()
    groups = ParamGroups(backbone_no_weight_decay=False)(task, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05] and all(g["lr_scale"] == 1.0 for g in groups)
    decayed = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in task.named_parameters() if id(p) in decayed}
    assert names == {n for n, p in task.named_parameters() if p.ndim >= 2 and p.requires_grad}  # incl. cls_token
    with_list = {id(p) for p in ParamGroups()(task, 0.05)[1]["params"]}  # fine-tuning: no_weight_decay() names too
    assert id(task.backbone.cls_token) in decayed and id(task.backbone.cls_token) not in with_list


def test_frozen_parameters_are_left_out():
    task = _Task()
    task.head[0].weight.requires_grad_(False)
    params = [p for g in ParamGroups()(task, 0.05) for p in g["params"]]
    assert all(p is not task.head[0].weight for p in params) and all(p.requires_grad for p in params)


@pytest.mark.parametrize("step", [0, 1, 100, 249, 250, 799, 800, 1099, 1100, 1199])
def test_multistep_matches_mmcv_linear_warmup_and_steps(step):
    """mmcv ``StepLrUpdater`` + linear warm-up, written out: regular lr * (1 - (1 - step/warmup) * (1 - ratio))."""
    sched = WarmupMultiStep(
        steps_per_epoch=100,
        epochs=12,
        warmup_epochs=0,
        milestones=(8, 11),
        gamma=0.1,
        warmup_steps=250,
        warmup_ratio=0.001,
    )
    regular = 0.1 ** ((step >= 800) + (step >= 1100))
    expected = regular * (1 - (1 - step / 250) * (1 - 0.001)) if step < 250 else regular
    assert sched(step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step", [0, 1, 1499, 1500, 80000, 159999, 160000])
def test_poly_matches_mmcv_poly_with_linear_warmup(step):
    """mmcv ``PolyLrUpdater(power=1, min_lr=0)`` + linear warm-up from 1e-6 over 1500 iterations (mmseg UperNet)."""
    sched = WarmupPoly(
        steps_per_epoch=160000, epochs=1, warmup_epochs=0, warmup_steps=1500, power=1.0, warmup_ratio=1e-6
    )
    regular = (1 - step / 160000) ** 1.0
    expected = regular * (1 - (1 - step / 1500) * (1 - 1e-6)) if step < 1500 else regular
    assert sched(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_iteration_warmup_and_epoch_warmup_are_exclusive():
    with pytest.raises(ValueError, match="set optim.warmup_epochs=0"):
        WarmupMultiStep(steps_per_epoch=100, epochs=12, warmup_epochs=1, milestones=(8, 11), warmup_steps=250)


def test_effective_batch_scales_the_lr():
    from types import SimpleNamespace

    from mimlab.optim import OptimizerFactory

    factory = OptimizerFactory(torch.optim.AdamW, blr=1.5e-4)
    trainer = SimpleNamespace(world_size=8, accumulate_grad_batches=8)
    assert factory.effective_batch(trainer, 64) == 4096
    assert factory.absolute_lr(trainer, 64) == pytest.approx(1.5e-4 * 4096 / 256)
    assert OptimizerFactory(torch.optim.AdamW, lr=1.5e-3).absolute_lr(trainer, 64) == 1.5e-3


def simmim_multistep_lr(step: int, lr: float, warmup_steps: int, milestones: list[int], gamma: float) -> float:
    """microsoft/SimMIM lr_scheduler.MultiStepLRScheduler (per step, warm-up from 0)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    return lr * gamma ** sum(step >= m for m in milestones)


@pytest.mark.parametrize("step", [0, 5, 999, 1000, 1001, 69_999, 70_000, 79_999])
def test_multistep_schedule_matches_simmim(step):
    from mimlab.optim import WarmupMultiStep

    sched = WarmupMultiStep(steps_per_epoch=100, epochs=800, warmup_epochs=10, milestones=[700], gamma=0.1)
    assert sched(step) * 1e-3 == pytest.approx(simmim_multistep_lr(step, 1e-3, 1000, [70_000], 0.1), rel=1e-12)


def test_a_recipe_chooses_the_schedule(tmp_path):
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from conftest import compose_config
    from mimlab.optim import WarmupCosine, WarmupMultiStep

    trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1, estimated_stepping_batches=8000, max_epochs=800)
    model = _Task()
    for experiment, kind in [("simmim_vit_tiny_synthetic", WarmupCosine), ("simmim_vit_b", WarmupMultiStep)]:
        factory = instantiate(compose_config([f"experiment={experiment}", "logger=csv"], tmp_path).optim)
        scheduler = factory(model, trainer, 128)["lr_scheduler"]["scheduler"]
        assert isinstance(scheduler.lr_lambdas[0], kind)
    assert scheduler.lr_lambdas[0](699 * 10) == 1.0 and scheduler.lr_lambdas[0](700 * 10) == pytest.approx(0.1)


def test_extending_a_finished_run_is_refused_unless_its_schedule_may_change(tmp_path, synthetic_root):
    """A 3-step run's cosine has reached 0 at step 3; resumed with trainer.max_steps=5 it would train at lr 0."""
    from conftest import TINY_MAE_QUIET, compose_config
    from mimlab.optim.schedule import ScheduleChangeError
    from mimlab.train import build

    common = [*TINY_MAE_QUIET, f"data.root={synthetic_root}", "trainer.limit_val_batches=0", "optim.warmup_epochs=0"]
    datamodule, module, trainer = build(compose_config([*common, "trainer.max_steps=3"], tmp_path))
    trainer.fit(module, datamodule=datamodule)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0

    longer = [*common, "trainer.max_steps=5", f"ckpt_path={last}"]
    datamodule, module, trainer = build(compose_config(longer, tmp_path / "refused"))
    with pytest.raises(
        ScheduleChangeError,
        match=r"WarmupCosine.*total_steps: 3\.0 -> 5\.0\); at step 3 it gives 0 x the base lr, this run's 0\.3455 x.*"
        r"allow_schedule_change=true to continue on this run's schedule from step 3",
    ):
        trainer.fit(module, datamodule=datamodule, ckpt_path=last)

    datamodule, module, trainer = build(compose_config([*longer, "allow_schedule_change=true"], tmp_path / "longer"))
    lrs = []
    module.on_train_batch_start = lambda batch, idx: lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
    trainer.fit(module, datamodule=datamodule, ckpt_path=last)
    base = trainer.lr_scheduler_configs[0].scheduler.base_lrs[0]
    assert trainer.global_step == 5
    assert lrs == pytest.approx([base * WarmupCosine(0.25, 20, 0)(s) for s in (3, 4)])  # this run's schedule
