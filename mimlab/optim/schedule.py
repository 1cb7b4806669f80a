"""Per-iteration lr schedules as LambdaLR factors: linear warm-up then half-cycle cosine (MAE ``util/lr_sched.py``) or
then step decays at epoch milestones (SimMIM ``lr_scheduler.py`` "multistep")."""
from __future__ import annotations

import math


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


class WarmupMultiStep:
    """lr(step) / base_lr: ``e / warmup`` while ``e < warmup``, then ``gamma ** (number of milestones <= e)``, floored at
    ``min_lr_ratio`` (SimMIM's 800-epoch recipes: warm-up 10 epochs, ×0.1 at epoch 700). Arguments as
    :class:`WarmupCosine` plus ``milestones`` (epochs) and ``gamma``."""

    def __init__(self, steps_per_epoch: float, epochs: float, warmup_epochs: float, min_lr_ratio: float = 0.0,
                 milestones: tuple[float, ...] = (), gamma: float = 0.1) -> None:
        self.steps_per_epoch = max(steps_per_epoch, 1e-12)
        self.warmup_epochs = min(warmup_epochs, epochs)
        self.min_lr_ratio = min_lr_ratio
        self.milestones = sorted(milestones)
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        epoch = step / self.steps_per_epoch
        if epoch < self.warmup_epochs:
            return epoch / self.warmup_epochs
        passed = sum(epoch >= m for m in self.milestones)
        return max(self.gamma**passed, self.min_lr_ratio)
