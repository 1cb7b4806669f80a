"""Per-step lr schedules as ``LambdaLR`` factors (each param group keeps its own base lr ``lr * lr_scale``).

Every schedule is built by :class:`~mimlab.optim.OptimizerFactory` as ``schedule(steps_per_epoch=, epochs=,
warmup_epochs=, min_lr_ratio=)`` (the run's length and the `optim` group's ``warmup_epochs`` / ``min_lr``), plus its
own knobs from a Hydra partial:

* :class:`WarmupCosine` — MAE ``util/lr_sched.py``: linear warm-up then half-cycle cosine (the default);
* :class:`WarmupMultiStep` — ×``gamma`` at epoch milestones: SimMIM ``lr_scheduler.py`` "multistep" (warm-up in
  epochs from 0) and the Mask R-CNN 1× schedule of mmdet / Detectron2 / ViTDet (warm-up in iterations from
  ``warmup_ratio``);
* :class:`WarmupPoly` — mmcv ``PolyLrUpdater`` with linear warm-up in iterations (the mmseg UperNet 160k schedule).
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


class _Warmup:
    """Linear warm-up factor over ``warmup_epochs`` (from 0) or, given ``warmup_steps``, over that many iterations
    from ``warmup_ratio`` (mmcv ``linear``: ``ratio + (1 - ratio) * step / warmup_steps``). Not both."""

    def __init__(
        self, steps_per_epoch: float, epochs: float, warmup_epochs: float, warmup_steps: int | None, warmup_ratio: float
    ) -> None:
        if warmup_steps is not None and warmup_epochs:
            raise ValueError(
                f"the schedule warms up over schedule.warmup_steps={warmup_steps} iterations; set "
                f"optim.warmup_epochs=0 (got {warmup_epochs}) or drop warmup_steps"
            )
        self.steps_per_epoch = max(steps_per_epoch, 1e-12)
        self.length = warmup_steps if warmup_steps is not None else min(warmup_epochs, epochs) * self.steps_per_epoch
        self.ratio = warmup_ratio if warmup_steps is not None else 0.0

    def __call__(self, step: int) -> float:
        return 1.0 if step >= self.length else self.ratio + (1 - self.ratio) * step / self.length


class WarmupMultiStep:
    """``gamma ** (number of epoch milestones passed)``, floored at ``min_lr_ratio``, times the linear warm-up.

    SimMIM's 800-epoch recipes: ``optim.warmup_epochs=10``, milestones ``[700]``. Mask R-CNN 1×: milestones
    ``[8, 11]`` of 12 epochs, ``warmup_steps=250`` from ``warmup_ratio=0.001`` (then ``optim.warmup_epochs=0``).
    """

    def __init__(
        self,
        steps_per_epoch: float,
        epochs: float,
        warmup_epochs: float,
        min_lr_ratio: float = 0.0,
        milestones: Sequence[float] = (),
        gamma: float = 0.1,
        warmup_steps: int | None = None,
        warmup_ratio: float = 0.0,
    ) -> None:
        self.warmup = _Warmup(steps_per_epoch, epochs, warmup_epochs, warmup_steps, warmup_ratio)
        self.steps_per_epoch = self.warmup.steps_per_epoch
        self.min_lr_ratio = min_lr_ratio
        self.milestones = sorted(milestones)
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        passed = sum(step / self.steps_per_epoch >= m for m in self.milestones)
        return self.warmup(step) * max(self.gamma**passed, self.min_lr_ratio)


class WarmupPoly:
    """mmcv ``PolyLrUpdater``: ``(1 - m) * (1 - step / total) ** power + m`` with ``m = min_lr_ratio`` and
    ``total = steps_per_epoch * epochs``, times the linear warm-up (UperNet 160k: ``warmup_steps=1500`` from 1e-6)."""

    def __init__(
        self,
        steps_per_epoch: float,
        epochs: float,
        warmup_epochs: float,
        min_lr_ratio: float = 0.0,
        power: float = 1.0,
        warmup_steps: int | None = None,
        warmup_ratio: float = 0.0,
    ) -> None:
        self.warmup = _Warmup(steps_per_epoch, epochs, warmup_epochs, warmup_steps, warmup_ratio)
        self.total_steps = max(self.warmup.steps_per_epoch * epochs, 1.0)
        self.power, self.min_lr_ratio = power, min_lr_ratio

    def __call__(self, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        return ((1 - self.min_lr_ratio) * (1 - progress) ** self.power + self.min_lr_ratio) * self.warmup(step)
