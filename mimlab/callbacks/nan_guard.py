"""``nan_guard`` for every task: a non-finite loss or gradient never reaches the weights.

The whole check lives in this callback, outside the training step, so a compiled step has no host sync and no graph
break for it: the loss is kept (detached) in ``on_before_backward`` and checked together with the gradients in
``on_before_optimizer_step``, in one device sync per step. ``nan_guard=off`` removes that sync too.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

MODES = ("stop", "skip", "off")


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradients became NaN/Inf; the message names the step, the batch and the term(s)."""


class NonFiniteGuard(L.Callback):
    """Checks the loss and the gradients after backward and before the optimiser step.

    A finite loss can still give non-finite gradients (an overflow in backward); stepping on them poisons the weights
    and every later step. ``mode``: 'stop' raises :class:`NonFiniteLossError` naming the step, the batch and the
    non-finite loss terms (those the task logged as ``train/<term>``); 'skip' drops the gradients (``grad = None``:
    the optimiser leaves those weights, their moments and weight decay untouched), puts back every buffer the skipped
    forward passes changed (BatchNorm running statistics: a copy of the module's buffers is taken before the first
    forward of each update) and stops the run once ``max_consecutive_skips`` updates in a row were skipped; 'off'
    checks nothing (no device sync). Under DDP the
    gradients are already all-reduced here, so every rank takes the same decision. With fp16 (a ``GradScaler``) the
    scaler skips such steps itself and the guard stays out of its way. Logs ``train/skipped_updates`` (total).
    """

    def __init__(self, mode: Literal["stop", "skip", "off"] = "stop", max_consecutive_skips: int = 10) -> None:
        if mode not in MODES:
            raise ValueError(f"nan_guard must be one of {', '.join(MODES)}; got {mode!r}")
        if max_consecutive_skips < 1:
            raise ValueError(f"nan_guard_max_skips must be >= 1, got {max_consecutive_skips}")
        self.mode, self.max_consecutive_skips = mode, max_consecutive_skips
        self.skipped_total = 0
        self.skipped_in_a_row: list[int] = []  # global steps of the current run of skipped updates
        self.batch_idx = 0
        self.loss: Tensor | None = None
        self.buffers: dict[str, Tensor] | None = None  # 'skip': the buffers before this update's first forward

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.batch_idx, self.loss = batch_idx, None
        if self.mode == "skip" and self.buffers is None:  # the first micro-batch of an update
            self.buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        buffers, self.buffers = self.buffers, None
        if self.mode == "off" or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checks = [torch.nn.utils.get_total_norm([p.grad for p in params])] if params else []
        if self.loss is not None:
            checks.append(self.loss.float().reshape(()).to(checks[0].device if checks else self.loss.device))
        grads_finite, loss_finite = True, True
        if checks:
            finite = torch.isfinite(torch.stack([c.float() for c in checks])).tolist()  # the one sync
            grads_finite = finite[0] if params else True
            loss_finite = finite[-1] if self.loss is not None else True
        if params and grads_finite and loss_finite:
            self.skipped_in_a_row = []
            return
        step = trainer.global_step
        what = (
            f"non-finite loss at global step {step}, batch {self.batch_idx}: {self._terms(trainer)}"
            if not loss_finite
            else f"non-finite gradients at global step {step} (the loss was finite)"
        )
        if self.mode == "stop":
            raise NonFiniteLossError(
                f"{what}. Lower the lr, check the data, clip gradients "
                "(trainer.gradient_clip_val), or set nan_guard=skip to skip such steps."
            )
        for p in params:
            p.grad = None
        for name, buffer in pl_module.named_buffers():
            if buffers is not None and name in buffers:
                buffer.copy_(buffers[name])
        self.skipped_total += 1
        self.skipped_in_a_row.append(step)
        pl_module.log("train/skipped_updates", float(self.skipped_total), on_step=True, on_epoch=False)
        if len(self.skipped_in_a_row) >= self.max_consecutive_skips:
            first = self.skipped_in_a_row[0]
            raise NonFiniteLossError(
                f"nan_guard=skip skipped {len(self.skipped_in_a_row)} updates in a row (global steps {first}-{step}): "
                "the run is diverging, not hitting a rare bad batch. Resume from a checkpoint saved before step "
                f"{first} with a lower lr or gradient clipping (nan_guard_max_skips sets this limit)."
            )
        if params:
            rank_zero_warn(f"{what}; skipping this update (nan_guard=skip)")

    @staticmethod
    def _terms(trainer: L.Trainer) -> str:
        """``term(s) a, b = nan, inf`` from the values the task logged this step as ``train/<term>`` (read only on
        this failure path: building ``callback_metrics`` reduces the logged values)."""
        bad = {}
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/") and key.endswith("_step"):
                number = float(value)
                if not math.isfinite(number):
                    bad[key[len("train/") : -len("_step")]] = number
        if not bad:
            return "term(s) loss"
        return f"term(s) {', '.join(bad)} = {', '.join(f'{v:.4g}' for v in bad.values())}"
