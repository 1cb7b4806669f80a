"""Per-step lr schedules as ``LambdaLR`` factors (each group keeps its own base lr ``lr * lr_scale``).

* :class:`WarmupCosine` — MAE ``util/lr_sched.py``: linear warm-up then half-cycle cosine, per iteration, in epochs
  (pre-training, fine-tuning, linear probing);
* :class:`WarmupMultiStep` — mmdet / Detectron2 Mask R-CNN: linear warm-up from ``warmup_ratio`` then ×``gamma`` at
  each milestone (detection);
* :class:`WarmupPoly` — mmseg UperNet: linear warm-up then polynomial decay (segmentation).

The step-based ones are built by :class:`~mimlab.optim.OptimizerFactory` from a Hydra partial with the run's
``total_steps`` (``trainer.estimated_stepping_batches``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence


class WarmupCosine:
    """lr(step) / base_lr at fractional epoch ``e = step / steps_per_epoch``.

    ``e < warmup``: ``e / warmup``; after: ``m + (1 - m) * 0.5 * (1 + cos(pi * (e - warmup) / (epochs - warmup)))`` with
    ``m = min_lr / base_lr``. Each param group keeps its own base lr (``lr * lr_scale``), as in MAE.
    """

    def __init__(self, steps_per_epoch: float, epochs: float, warmup_epochs: float, min_lr_ratio: float = 0.0) -> None:
        self.steps_per_epoch = max(steps_per_epoch, 1e-12)
        self.epochs = epochs
        self.warmup_epochs = min(warmup_epochs, epochs)
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        epoch = step / self.steps_per_epoch
        if epoch < self.warmup_epochs:
            return epoch / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        progress = min((epoch - self.warmup_epochs) / span, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, warmup_ratio: float) -> float:
    """mmcv ``linear`` warm-up factor: ``warmup_ratio`` at step 0 rising to 1 at ``warmup_steps``."""
    if step >= warmup_steps:
        return 1.0
    return warmup_ratio + (1 - warmup_ratio) * step / warmup_steps


class WarmupMultiStep:
    """Linear warm-up, then ×``gamma`` at each milestone (fractions of ``total_steps``): the Mask R-CNN 1× schedule
    (12 epochs, steps at epochs 8 and 11, 250 warm-up iterations from 0.001 in mmdet / Detectron2 / ViTDet)."""

    def __init__(self, total_steps: int, warmup_steps: int = 250, milestones: Sequence[float] = (8 / 12, 11 / 12),
                 gamma: float = 0.1, warmup_ratio: float = 0.001) -> None:
        self.warmup_steps, self.gamma, self.warmup_ratio = warmup_steps, gamma, warmup_ratio
        self.marks = [int(m * total_steps) for m in milestones]

    def __call__(self, step: int) -> float:
        return linear_warmup(step, self.warmup_steps, self.warmup_ratio) * self.gamma ** sum(step >= m for m in self.marks)


class WarmupPoly:
    """mmcv ``PolyLrUpdater`` with linear warm-up: ``(1 - min_ratio) * (1 - step / total) ** power + min_ratio``, times the
    warm-up factor during the first ``warmup_steps`` (the UperNet 160k schedule: warm-up 1500 from 1e-6, power 1.0)."""

    def __init__(self, total_steps: int, warmup_steps: int = 1500, power: float = 1.0, min_ratio: float = 0.0,
                 warmup_ratio: float = 1e-6) -> None:
        self.total_steps = max(total_steps, 1)
        self.warmup_steps, self.power, self.min_ratio, self.warmup_ratio = warmup_steps, power, min_ratio, warmup_ratio

    def __call__(self, step: int) -> float:
        poly = (1 - self.min_ratio) * (1 - min(step, self.total_steps) / self.total_steps) ** self.power + self.min_ratio
        return poly * linear_warmup(step, self.warmup_steps, self.warmup_ratio)
