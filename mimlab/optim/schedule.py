"""Per-step lr schedules as ``LambdaLR`` factors (each param group keeps its own base lr ``lr * lr_scale``).

Every schedule is built by :class:`~mimlab.optim.OptimizerFactory` as ``schedule(steps_per_epoch=, epochs=,
warmup_epochs=, min_lr_ratio=)`` (the run's length and the `optim` group's ``warmup_epochs`` / ``min_lr``), plus its
own knobs from a Hydra partial:

* :class:`WarmupCosine` — MAE ``util/lr_sched.py``: linear warm-up then half-cycle cosine (the default);
* :class:`WarmupMultiStep` — ×``gamma`` at epoch milestones: SimMIM ``lr_scheduler.py`` "multistep" (warm-up in
  epochs from 0) and the Mask R-CNN 1× schedule of mmdet / Detectron2 / ViTDet (warm-up in iterations from
  ``warmup_ratio``);
* :class:`WarmupPoly` — mmcv ``PolyLrUpdater`` with linear warm-up in iterations (the mmseg UperNet 160k schedule).

:class:`ResumableLambdaLR` runs them: a resumed run keeps the schedule its config plans, and a schedule that differs
from the checkpoint's (a finished run extended with a larger ``trainer.max_steps``) is refused unless
``allow_schedule_change=true``.
"""

from __future__ import annotations

import copy
import logging
import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from mimlab.checkpoints.files import weights_only_form
from mimlab.utils.refusal import Refusal

log = logging.getLogger(__name__)


class WarmupCosine:
    """lr(step) / base_lr at fractional epoch ``e = step / steps_per_epoch``.

    ``e < warmup``: ``e / warmup``; after: ``m + (1 - m) * 0.5 * (1 + cos(pi * (e - warmup) / (epochs - warmup)))`` with
    ``m = min_lr / base_lr``. Each param group keeps its own base lr (``lr * lr_scale``), as in MAE.
    """

    def __init__(self, steps_per_epoch: float, epochs: float, warmup_epochs: float, min_lr_ratio: float = 0.0) -> None:
        self.steps_per_epoch = max(steps_per_epoch, 1e-12)
        self.epochs = epochs
        self.total_steps = steps_per_epoch * epochs
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
        self.total_steps = steps_per_epoch * epochs
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


class ScheduleChangeError(Refusal, ValueError):
    """A resumed run plans another lr schedule than its checkpoint; the message lists the differences."""


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every differing leaf of two schedules' parameter dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _with_parameters(schedule: Callable[[int], float], saved: dict) -> Callable[[int], float]:
    """A copy of ``schedule`` with the parameters a checkpoint recorded (nested schedule parts included)."""
    out = copy.deepcopy(schedule)

    def assign(obj: Any, values: dict) -> None:
        for key, value in values.items():
            part = getattr(obj, key, None)
            if isinstance(value, dict) and hasattr(part, "__dict__"):
                assign(part, value)
            else:
                setattr(obj, key, value)

    assign(out, saved)
    return out


class ResumableLambdaLR(LambdaLR):
    """``LambdaLR`` over a schedule object whose parameters come from the run's config (steps, warm-up, floor).

    ``LambdaLR`` would overwrite the schedule with the checkpoint's parameters on resume, so a finished 20-step run
    extended to 30 steps would train its last 10 steps at the end lr of its 20-step schedule (0 for a cosine to 0)
    without a word. Here the checkpoint's parameters (``lr_lambdas``, stored weights-only) are compared with this run's:
    equal, the run continues exactly; different, :class:`ScheduleChangeError` lists them with the lr factor each gives
    at the resumed step, unless ``allow_change`` (``allow_schedule_change=true``), when this run's schedule continues
    from that step (the optimiser's lr is set to it, logged as a warning).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float], allow_change: bool = False):
        self._allow_change = allow_change
        super().__init__(optimizer, lr_lambda)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_allow_change", None)
        return state

    def _parameters(self) -> list[Any]:
        return [None if isinstance(fn, types.FunctionType) else weights_only_form(vars(fn)) for fn in self.lr_lambdas]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {k: v for k, v in state_dict.items() if k not in ("lr_lambdas", "_allow_change")}
        saved, current = weights_only_form(state_dict.get("lr_lambdas")), self._parameters()
        LRScheduler.load_state_dict(self, state)  # base lrs, step count, last lr
        if saved is None or saved == current:
            return
        step = self.last_epoch
        index = next(i for i, (a, b) in enumerate(zip(saved, current)) if a != b)
        schedule = self.lr_lambdas[index]
        differences = ", ".join(_differences(saved[index], current[index]))
        try:
            before = f"{_with_parameters(schedule, saved[index])(step):.4g}"
        except Exception:  # parameters of an older schedule version
            before = "?"
        after = schedule(step)
        change = (
            f"the checkpoint's lr schedule ({type(schedule).__name__}) differs from the one this run's config plans "
            f"({differences}); at step {step} it gives {before} x the base lr, this run's {after:.4g} x"
        )
        if not self._allow_change:
            raise ScheduleChangeError(
                f"{change}. Continuing would keep the checkpoint's schedule: a run extended after it ended (larger "
                "trainer.max_steps / trainer.max_epochs) would train its extra steps at the schedule's end lr. "
                "Resume with the run's original trainer/optim settings, or set allow_schedule_change=true to "
                f"continue on this run's schedule from step {step}."
            )
        log.warning("%s: continuing on this run's schedule (allow_schedule_change=true)", change)
        self._last_lr = [base * fn(step) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
