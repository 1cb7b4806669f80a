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
