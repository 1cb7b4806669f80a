"""MSE on masked units only (MAE / FCMAE / iTPN-pixel)."""
from __future__ import annotations

from torch import Tensor, nn


class MaskedMSE(nn.Module):
    """``((pred - target)**2).mean(-1)`` per unit, averaged over masked units: ``(loss * mask).sum() / mask.sum()``.

    pred, target: (N, L, D); mask: (N, L), 1 = masked. Returns ``{"loss": ...}``. Computed in fp32.
    """

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
        per_unit = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        mask = mask.float()
        loss = (per_unit * mask).sum() / mask.sum().clamp_min(1.0)
        return {"loss": loss}
