"""Losses for multi-output pre-training (iTPN-CLIP: two heads; iTPN-EMA: pixels + one feature term per level).

Mask convention: (N, L), 1 = masked. Predictions / targets are per unit: (N, L, D).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MaskedSmoothL1(nn.Module):
    """Smooth-L1 (``beta``) per element, averaged over D, then over masked units (``masked_only``) or all units.

    With ``masked_only=False`` this equals ``nn.SmoothL1Loss(beta=beta)`` (mean over every element), which is what
    iTPN-CLIP uses ("we supervise all tokens as default"). Returns ``{"loss": value}``. Computed in fp32.
    """

    def __init__(self, beta: float = 1.0, masked_only: bool = True) -> None:
        super().__init__()
        self.beta, self.masked_only = beta, masked_only

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
        per_unit = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=self.beta).mean(-1)
        if not self.masked_only:
            return {"loss": per_unit.mean()}
        mask = mask.float()
        return {"loss": (per_unit * mask).sum() / mask.sum().clamp_min(1.0)}


class WeightedLossSum(nn.Module):
    """``loss = Σ_k weights[k] · terms[k](pred[k], target[k], mask)["loss"]``.

    ``pred`` is a dict keyed like ``terms``; ``target`` is a dict with the same keys or one tensor shared by every term
    (iTPN-CLIP: both heads regress the same teacher features). Returns ``{"loss": total, "<k>": term value (detached)}``.
    """

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        weights = dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"loss.weights has keys {sorted(unknown)} that are not in loss.terms {sorted(terms)}")
        self.weights = {k: float(weights.get(k, 1.0)) for k in terms}

    def forward(self, pred: dict[str, Tensor], target: dict[str, Tensor] | Tensor, mask: Tensor) -> dict[str, Tensor]:
        missing = [k for k in self.terms if k not in pred]
        if missing:
            raise KeyError(f"the decoder returned {sorted(pred)} but loss.terms needs {missing}")
        out: dict[str, Tensor] = {}
        total = 0.0
        for k, term in self.terms.items():
            tgt = target[k] if isinstance(target, dict) else target
            value = term(pred[k], tgt, mask)["loss"]
            out[k] = value.detach()
            total = total + self.weights[k] * value
        out["loss"] = total  # type: ignore[assignment]
        return out
