"""MSE on masked units only (MAE / FCMAE / iTPN-pixel / MaskFeat)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def masked_unit_mean(pred: Tensor, target: Tensor, mask: Tensor, distance: Callable[[Tensor], Tensor]) -> Tensor:
    """``distance(pred - target).mean(-1)`` per unit, averaged over masked units: ``(d * mask).sum() / mask.sum()``.

    pred, target: (N, L, D); mask: (N, L), 1 = masked. Computed in fp32."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
    per_unit = distance(pred.float() - target.float()).mean(dim=-1)
    mask = mask.float()
    return (per_unit * mask).sum() / mask.sum().clamp_min(1.0)


class MaskedMSE(nn.Module):
    """``((pred - target)**2).mean(-1)`` per unit, averaged over masked units: ``(loss * mask).sum() / mask.sum()``.

    pred, target: (N, L, D); mask: (N, L), 1 = masked. Returns ``{"loss": ...}``. Computed in fp32.
    """

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {"loss": masked_unit_mean(pred, target, mask, torch.square)}
