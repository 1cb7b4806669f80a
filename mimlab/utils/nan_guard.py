"""Non-finite loss guard used by every task's ``training_step``."""
from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/Inf; the message names the step, the batch and the term(s)."""


def check_finite(losses: dict[str, Tensor], mode: str, step: int, batch_idx: int) -> bool:
    """True if every loss term is finite. ``mode``: 'stop' raises naming the term(s), 'skip' warns and returns False
    (the update is then skipped by :class:`mimlab.callbacks.nan_guard.NonFiniteGuard`, which sees the gradients),
    'off' never checks. 'stop'/'skip' synchronise with the device once per step (one ``.item()``)."""
    if mode == "off":
        return True
    if bool(torch.isfinite(losses["loss"]).item()):
        return True
    bad = [name for name, value in losses.items() if not bool(torch.isfinite(value).all().item())]
    message = (f"non-finite loss at global step {step}, batch {batch_idx}: term(s) {', '.join(bad)} "
               f"= {', '.join(f'{float(losses[n].detach().float().mean()):.4g}' for n in bad)}")
    if mode == "stop":
        raise NonFiniteLossError(message + ". Lower the lr, check the data, or set nan_guard=skip to skip such steps.")
    if mode == "skip":
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(message + "; skipping this update (nan_guard=skip)")  # the guard drops its gradients
        return False
    raise ValueError(f"nan_guard must be 'stop', 'skip' or 'off', got {mode!r}")
