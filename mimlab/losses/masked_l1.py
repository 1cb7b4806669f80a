"""L1 on masked units only (SimMIM, github.com/microsoft/SimMIM ``models/simmim.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mimlab.losses.masked_mse import masked_unit_mean


class MaskedL1(nn.Module):
    """``|pred - target|.mean(-1)`` per unit, averaged over masked units: ``(loss * mask).sum() / mask.sum()``.

    pred, target: (N, L, D) (D = unit² · 3 pixels of a unit); mask: (N, L), 1 = masked. All units have D values, so
    this is SimMIM's mean absolute error over every masked pixel and channel (official: the sum over masked pixels
    divided by their count plus 1e-5, then by the 3 channels). Returns ``{"loss": ...}``, computed in fp32.
    """

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {"loss": masked_unit_mean(pred, target, mask, torch.abs)}
