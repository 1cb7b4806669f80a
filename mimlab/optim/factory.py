"""Optimiser + per-step schedule for every task: lr = blr * effective_batch / 256 (or an absolute lr), param groups."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from mimlab.optim.param_groups import ParamGroups
from mimlab.optim.schedule import ResumableLambdaLR, WarmupCosine


class OptimizerFactory:
    """Builds the optimiser and its per-step LR schedule for a LightningModule (``configure_optimizers``).

    Args:
        optimizer: partial optimiser class (e.g. ``torch.optim.AdamW`` with betas/fused), called with param groups and lr.
        blr: base lr; the absolute lr is ``blr * effective_batch / base_batch`` unless ``lr`` is given.
        lr: absolute lr (overrides blr scaling, e.g. iTPN-CLIP's 1.5e-3 and the detection/segmentation recipes).
        weight_decay: decay for >=2-D weights.
        min_lr, warmup_epochs: passed to the schedule (epochs may be fractional).
        param_groups: the one builder, :class:`~mimlab.optim.param_groups.ParamGroups` (layer decay, weight-decay split).
        schedule: ``f(steps_per_epoch, epochs, warmup_epochs, min_lr_ratio) -> (step -> lr factor)``, a partial of a
            :mod:`mimlab.optim.schedule` class with its own knobs; default :class:`WarmupCosine` (MAE).
        allow_schedule_change: resume a checkpoint whose schedule differs from this run's (e.g. a longer run) on this
            run's schedule instead of refusing (:class:`~mimlab.optim.schedule.ResumableLambdaLR`).
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        blr: float = 1.5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        min_lr: float = 0.0,
        warmup_epochs: float = 40,
        base_batch: int = 256,
        param_groups: Callable[[nn.Module, float], list[dict]] | None = None,
        schedule: Callable[..., Callable[[int], float]] | None = None,
        allow_schedule_change: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.blr = blr
        self.lr = lr
        self.weight_decay = weight_decay
        self.min_lr = min_lr
        self.warmup_epochs = warmup_epochs
        self.base_batch = base_batch
        self.param_groups = param_groups if param_groups is not None else ParamGroups(backbone_no_weight_decay=False)
        self.schedule = schedule or WarmupCosine
        self.allow_schedule_change = allow_schedule_change

    @staticmethod
    def effective_batch(trainer: L.Trainer, batch_size: int) -> int:
        """Per-device batch x devices x nodes x gradient accumulation."""
        return batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def absolute_lr(self, trainer: L.Trainer, batch_size: int) -> float:
        if self.lr is not None:
            return float(self.lr)
        return self.blr * self.effective_batch(trainer, batch_size) / self.base_batch

    def lr_lambda(self, trainer: L.Trainer, lr: float) -> Callable[[int], float]:
        """The per-step factor for this run (a max-steps run without epochs counts as one epoch)."""
        total_steps = max(int(trainer.estimated_stepping_batches), 1)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        return self.schedule(
            steps_per_epoch=total_steps / epochs,
            epochs=epochs,
            warmup_epochs=self.warmup_epochs,
            min_lr_ratio=self.min_lr / lr if lr > 0 else 0.0,
        )

    def __call__(self, module: nn.Module, trainer: L.Trainer, batch_size: int) -> dict:
        lr = self.absolute_lr(trainer, batch_size)
        groups = self.param_groups(module, self.weight_decay)
        for group in groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer = self.optimizer(groups, lr=lr)
        scheduler = ResumableLambdaLR(optimizer, self.lr_lambda(trainer, lr), self.allow_schedule_change)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
