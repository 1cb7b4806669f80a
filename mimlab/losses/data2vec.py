"""data2vec 2.0 loss (Baevski et al. 2022; fairseq ``examples/data2vec/models/data2vec2.py`` ``d2v_loss`` + the ``model``
criterion, which sums every loss term and divides by the number of masked tokens).

With ``ℓ`` the squared error (``beta = 0``) or smooth-L1(``beta``), ``s = 1/sqrt(D)`` (``loss_scale`` None) and
``n`` masked tokens over all R = N·M mask rows:

    regression = s · Σ_{masked tokens} Σ_d ℓ(pred − target) / n
    cls        = cls_weight · s · Σ_{rows} Σ_d ℓ(cls − mean_tokens(target))

The cls term is summed over the rows of the (per-device) batch, not averaged, exactly as the official normalisation
gives (``cls_loss · sample_size`` before the division by ``sample_size``), so its relative weight grows with
``batch × clones`` per device. ``loss = regression + cls``. Also returned (detached): ``pred_std`` and ``target_std``,
the mean over channels of the per-channel std over the masked tokens (fairseq logs them as ``pred_var`` /
``target_var`` and stops training when they collapse).

Shapes: pred ``{"tokens": (R, L, D), "cls": (R, D)}``, target (R, L, D), mask (R, L) or ``MaskSet``, 1 = masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimlab.masking import MaskSet, as_mask_set


def masked_std(x: Tensor, weights: Tensor) -> Tensor:
    """Mean over channels of the unbiased std over the tokens with weight 1: x (R, L, D), weights (R, L) -> scalar."""
    w = weights.unsqueeze(-1)
    n = weights.sum()
    mean = (x * w).sum((0, 1)) / n
    var = (((x - mean) ** 2) * w).sum((0, 1)) / (n - 1).clamp_min(1.0)
    return torch.sqrt(var + 1e-6).mean()


class Data2VecLoss(nn.Module):
    """Args: cls_weight (``cls_loss``, 0.01 for images), beta (``loss_beta``, 0 = squared error), scale (``loss_scale``,
    None = 1/sqrt(D))."""

    def __init__(self, cls_weight: float = 0.01, beta: float = 0.0, scale: float | None = None) -> None:
        super().__init__()
        self.cls_weight, self.beta, self.scale = cls_weight, beta, scale

    def _error(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.beta == 0:
            return (pred - target) ** 2
        return F.smooth_l1_loss(pred, target, reduction="none", beta=self.beta)

    def forward(self, pred: dict[str, Tensor], target: Tensor, mask: Tensor | MaskSet) -> dict[str, Tensor]:
        tokens, target = pred["tokens"].float(), target.float()
        if tokens.shape != target.shape:
            raise ValueError(
                f"data2vec prediction {tuple(tokens.shape)} does not match the target {tuple(target.shape)}: "
                "check that the decoder predicts the encoder width for every patch of every mask row"
            )
        weights = as_mask_set(mask).mask.to(tokens.dtype)
        if weights.shape != tokens.shape[:2]:
            raise ValueError(
                f"mask {tuple(weights.shape)} is not on the {tokens.shape[1]}-patch grid of the target: "
                "masking.unit_size must equal the backbone patch size"
            )
        scale = self.scale if self.scale is not None else tokens.shape[-1] ** -0.5
        per_token = self._error(tokens, target).sum(-1)  # (R, L)
        regression = scale * (per_token * weights).sum() / weights.sum().clamp_min(1.0)
        cls = regression.new_zeros(())
        if self.cls_weight > 0:
            if "cls" not in pred:
                raise ValueError(
                    "loss.cls_weight > 0 needs the encoder's cls token: set model.backbone.class_token=true "
                    "or loss.cls_weight=0"
                )
            cls = self.cls_weight * scale * self._error(pred["cls"].float(), target.mean(1)).sum()
        with torch.no_grad():
            pred_std, target_std = masked_std(tokens, weights), masked_std(target, weights)
        return {
            "loss": regression + cls,
            "loss_regression": regression.detach(),
            "loss_cls": cls.detach(),
            "pred_std": pred_std,
            "target_std": target_std,
        }
