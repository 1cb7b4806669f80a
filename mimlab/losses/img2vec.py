"""Img2Vec losses: smooth-L1 patch loss on teacher tokens + smooth-L1 global semantic loss.

Review of Pan et al. (arXiv 2304.12535), eq. (2)-(4), as far as the review states them:

    L_patch  = 1/Omega(M) * sum_{i in M} SmoothL1_beta(p_i, t_i)         (M = masked tokens, Omega = cardinality)
    L_global = SmoothL1_beta(GAP_{v in V} g_v, GAP_{k in K} t_k)          (V = visible student tokens, K = teacher tokens)
    L        = L_patch + lambda * L_global,  beta = 2, lambda = 0.5

``SmoothL1_beta(x) = 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta`` element-wise (``F.smooth_l1_loss``),
averaged over the C feature channels of a token (our choice; the review does not say sum or mean).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimlab.masking import mask_to_token_grid

Positions = Literal["masked", "visible", "all"]


def position_weights(mask: Tensor, positions: Positions) -> Tensor:
    """Per-token weights that select the positions the patch loss averages over. ``mask``: (N, K), 1 = masked."""
    if positions == "masked":
        return mask
    if positions == "visible":
        return 1.0 - mask
    if positions == "all":
        return torch.ones_like(mask)
    raise ValueError(f"loss.positions must be 'masked', 'visible' or 'all', got {positions!r}")


class Img2VecLoss(nn.Module):
    """``forward(pred, target, mask) -> {"loss", "loss_patch", "loss_global"}``.

    Args (shapes):
        pred: ``{"tokens": (N, K, C)`` student predictions on the teacher grid (row-major),
              ``"global": (N, C)`` projected GAP of the visible student tokens``}``.
        target: teacher feature map ``(N, C, h, w)`` with ``h * w = K``.
        mask: ``(N, L)`` over mask units (1 = masked); upsampled to the teacher grid when units are
              larger than the teacher stride (``mimlab.masking.mask_to_token_grid``).
    """

    def __init__(
        self,
        beta: float = 2.0,
        global_weight: float = 0.5,
        global_beta: float | None = None,
        positions: Positions = "masked",
    ) -> None:
        super().__init__()
        position_weights(torch.zeros(1, 1), positions)  # validate early, before any data is touched
        self.beta, self.global_weight, self.positions = beta, global_weight, positions
        self.global_beta = beta if global_beta is None else global_beta

    def forward(self, pred: dict[str, Tensor], target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        tokens, grid = target.flatten(2).transpose(1, 2), tuple(target.shape[-2:])
        if pred["tokens"].shape != tokens.shape:
            raise ValueError(
                f"Img2Vec prediction {tuple(pred['tokens'].shape)} does not match teacher tokens {tuple(tokens.shape)}: "
                "check model.decoder.out_dim == target.dim and model.decoder.out_stride == target.stride"
            )
        weights = position_weights(mask_to_token_grid(mask, grid).to(tokens.dtype), self.positions)  # type: ignore[arg-type]
        per_token = F.smooth_l1_loss(pred["tokens"].float(), tokens, beta=self.beta, reduction="none").mean(-1)
        loss_patch = (per_token * weights).sum() / weights.sum().clamp_min(1.0)
        loss_global = F.smooth_l1_loss(pred["global"].float(), tokens.mean(1), beta=self.global_beta)
        return {
            "loss": loss_patch + self.global_weight * loss_global,
            "loss_patch": loss_patch,
            "loss_global": loss_global,
        }
