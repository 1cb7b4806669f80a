import math

import pytest
import torch
from torch import nn

from mimlab.optim import WarmupCosine, weight_decay_groups


def mae_lr(epoch: float, lr: float, min_lr: float, warmup: float, epochs: float) -> float:
    """facebookresearch/mae util/lr_sched.adjust_learning_rate, written out."""
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


@pytest.mark.parametrize("step", [0, 1, 37, 399, 400, 401, 1234, 3999])
def test_schedule_matches_mae_per_iteration_formula(step):
    sched = WarmupCosine(steps_per_epoch=100, epochs=40, warmup_epochs=4, min_lr_ratio=1e-6 / 1e-3)
    assert sched(step) * 1e-3 == pytest.approx(mae_lr(step / 100, 1e-3, 1e-6, 4, 40), rel=1e-9, abs=1e-15)


def test_no_weight_decay_for_1d_params_and_biases():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = weight_decay_groups(model, 0.05)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_wd[0.05] == {id(model[0].weight)}
    assert by_wd[0.0] == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


def test_frozen_parameters_are_left_out():
    model = nn.Linear(4, 4)
    model.weight.requires_grad_(False)
    params = [p for g in weight_decay_groups(model, 0.05) for p in g["params"]]
    assert all(p is not model.weight for p in params)


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
    model = nn.Linear(2, 2)
    for experiment, kind in [("simmim_vit_tiny_synthetic", WarmupCosine), ("simmim_vit_b", WarmupMultiStep)]:
        factory = instantiate(compose_config([f"experiment={experiment}", "logger=csv"], tmp_path).optim)
        scheduler = factory(model, trainer, 128)["lr_scheduler"]["scheduler"]
        assert isinstance(scheduler.lr_lambdas[0], kind)
    assert scheduler.lr_lambdas[0](699 * 10) == 1.0 and scheduler.lr_lambdas[0](700 * 10) == pytest.approx(0.1)
