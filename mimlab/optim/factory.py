"""Optimiser + schedule for every task: lr = blr * effective_batch / 256, param groups, warm-up cosine per step."""
from __future__ import annotations

from collections.abc import Callable
import lightning as L
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from mimlab.optim.schedule import WarmupCosine


def weight_decay_groups(module: nn.Module, weight_decay: float, use_no_weight_decay_list: bool = False) -> list[dict]:
    """Two groups (timm ``param_groups_weight_decay``, = MAE ``add_weight_decay``): no decay for 1-D params and biases.

    With ``use_no_weight_decay_list`` the names in each submodule's ``no_weight_decay()`` are skipped too (fine-tuning).
    Frozen parameters (``requires_grad=False``) are left out.
    """
    skip: set[str] = set()
    if use_no_weight_decay_list:
        for prefix, sub in module.named_modules():
            if hasattr(sub, "no_weight_decay") and sub is not module:
                skip |= {f"{prefix}.{name}" if prefix else name for name in sub.no_weight_decay()}
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)


class OptimizerFactory:
    """Builds the optimiser and its per-step LR schedule for a LightningModule.

    Args:
        optimizer: partial optimiser class (e.g. ``torch.optim.AdamW`` with betas/fused), called with param groups and lr.
        blr: base lr; the absolute lr is ``blr * effective_batch / base_batch`` unless ``lr`` is given.
        lr: absolute lr (overrides blr scaling, e.g. iTPN-CLIP's 1.5e-3).
        weight_decay: decay for >=2-D weights.
        min_lr, warmup_epochs: the warm-up cosine schedule (epochs may be fractional).
        param_groups: ``f(module, weight_decay) -> list[dict]`` (weight-decay groups; layer-decay groups for fine-tuning).
        schedule: ``f(steps_per_epoch, epochs, warmup_epochs, min_lr_ratio) -> (step -> lr factor)``; default
            :class:`WarmupCosine`, e.g. a partial :class:`~mimlab.optim.schedule.WarmupMultiStep` for SimMIM.
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
        param_groups: Callable[..., list[dict]] = weight_decay_groups,
        schedule: Callable[..., Callable[[int], float]] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.blr = blr
        self.lr = lr
        self.weight_decay = weight_decay
        self.min_lr = min_lr
        self.warmup_epochs = warmup_epochs
        self.base_batch = base_batch
        self.param_groups = param_groups
        self.schedule = schedule or WarmupCosine

    @staticmethod
    def effective_batch(trainer: L.Trainer, batch_size: int) -> int:
        """Per-device batch x devices x nodes x gradient accumulation."""
        return batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def absolute_lr(self, trainer: L.Trainer, batch_size: int) -> float:
        if self.lr is not None:
            return float(self.lr)
        return self.blr * self.effective_batch(trainer, batch_size) / self.base_batch

    def __call__(self, module: nn.Module, trainer: L.Trainer, batch_size: int) -> dict:
        lr = self.absolute_lr(trainer, batch_size)
        groups = self.param_groups(module, self.weight_decay)
        for group in groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer = self.optimizer(groups, lr=lr)
        total_steps = max(int(trainer.estimated_stepping_batches), 1)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        schedule = self.schedule(steps_per_epoch=total_steps / epochs, epochs=epochs, warmup_epochs=self.warmup_epochs,
                                 min_lr_ratio=self.min_lr / lr if lr > 0 else 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

