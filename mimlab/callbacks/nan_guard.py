"""``nan_guard`` for every task: non-finite gradients never reach the weights."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from mimlab.utils.nan_guard import NonFiniteLossError

MODES = ("stop", "skip", "off")


class NonFiniteGuard(L.Callback):
    """Checks the gradients after backward and before the optimiser step (``on_before_optimizer_step``).

    A finite loss can still give non-finite gradients (an overflow in backward); stepping on them poisons the weights
    and every later step. ``mode``: 'stop' raises :class:`NonFiniteLossError` naming the step; 'skip' drops the
    gradients (``grad = None``: the optimiser leaves those weights, their moments and weight decay untouched) and
    stops the run once ``max_consecutive_skips`` updates in a row were skipped; 'off' checks nothing (no device sync).
    A step whose backward was skipped (the task returned no loss) counts as skipped. Under DDP the gradients are
    already all-reduced here, so every rank takes the same decision. With fp16 (a ``GradScaler``) the scaler skips
    such steps itself and the guard stays out of its way. Logs ``train/skipped_updates`` (total).
    """

    def __init__(self, mode: str = "stop", max_consecutive_skips: int = 10) -> None:
        if mode not in MODES:
            raise ValueError(f"nan_guard must be one of {', '.join(MODES)}; got {mode!r}")
        if max_consecutive_skips < 1:
            raise ValueError(f"nan_guard_max_skips must be >= 1, got {max_consecutive_skips}")
        self.mode, self.max_consecutive_skips = mode, max_consecutive_skips
        self.skipped_total = 0
        self.skipped_in_a_row: list[int] = []  # global steps of the current run of skipped updates

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.mode == "off" or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params and bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])).item()):
            self.skipped_in_a_row = []
            return
        step = trainer.global_step
        if self.mode == "stop":
            raise NonFiniteLossError(f"non-finite gradients at global step {step} (the loss was finite). Lower the lr, "
                                     "clip gradients (trainer.gradient_clip_val), or set nan_guard=skip to skip such steps.")
        for p in params:
            p.grad = None
        self.skipped_total += 1
        self.skipped_in_a_row.append(step)
        pl_module.log("train/skipped_updates", float(self.skipped_total), on_step=True, on_epoch=False)
        if len(self.skipped_in_a_row) >= self.max_consecutive_skips:
            first = self.skipped_in_a_row[0]
            raise NonFiniteLossError(
                f"nan_guard=skip skipped {len(self.skipped_in_a_row)} updates in a row (global steps {first}-{step}): "
                "the run is diverging, not hitting a rare bad batch. Resume from a checkpoint saved before step "
                f"{first} with a lower lr or gradient clipping (nan_guard_max_skips sets this limit).")
        if params:
            rank_zero_warn(f"non-finite gradients at global step {step}; skipping this update (nan_guard=skip)")
