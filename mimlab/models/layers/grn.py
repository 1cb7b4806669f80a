"""Global Response Normalization (ConvNeXt V2), with an optional mask for masked-dense FCMAE.

Reference: ConvNeXt-V2 ``models/utils.py`` (dense GRN) and the JAX masked-dense block in its
TRAINING.md; docs/methods.md §3.2.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GRN"]


class GRN(nn.Module):
    """GRN over a channels-last tensor ``x`` of shape ``(N, H, W, C)``.

    ``Gx = ||x||_2 over (H, W)`` (per sample, per channel), ``Nx = Gx / (mean_C(Gx) + eps)``,
    ``y = gamma * (x * Nx) + beta + x``. The normaliser is the channel *mean* as in the official
    code (the paper writes a sum; the two differ by the constant C, absorbed by ``gamma``).
    ``gamma`` and ``beta`` have shape ``(C,)`` and start at zero, so GRN is the identity at init.

    ``mask``: optional ``(N, H, W, 1)`` float, ``1 = masked`` (MAE convention), given during masked
    (FCMAE) pre-training. The L2 norm then runs over the **visible** positions only, pooled as
    ``masked_pooling`` says:

    * ``"sample"`` (default): per sample, as the JAX masked-dense reference in ConvNeXt-V2 TRAINING.md
      and as the dense GRN that fine-tuning uses, so pre-training and transfer compute the same statistic;
    * ``"batch"``: over the visible positions of **all samples of the batch** (one ``(1, 1, 1, C)`` norm),
      exactly what the official sparse encoder's ``MinkowskiGRN`` computes (``torch.norm(x.F, dim=0)`` over
      every active point; ConvNeXt-V2 #86). Choose it to reproduce the official FCMAE pre-training.

    The JAX reference puts ``eps`` inside the square root; we keep the code's plain norm so that a ``mask``
    of all zeros gives exactly the dense GRN. The output is computed at every position; callers zero the
    masked ones. Without a mask the statistic is always per sample (official dense GRN).
    """

    def __init__(self, dim: int, eps: float = 1e-6, masked_pooling: str = "sample") -> None:
        super().__init__()
        if masked_pooling not in ("sample", "batch"):
            raise ValueError(f"GRN masked_pooling must be 'sample' or 'batch', got {masked_pooling!r}")
        self.eps = eps
        self.masked_pooling = masked_pooling
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        visible = x if mask is None else x * (1.0 - mask)
        dims = (0, 1, 2) if mask is not None and self.masked_pooling == "batch" else (1, 2)
        gx = torch.linalg.vector_norm(visible, ord=2, dim=dims, keepdim=True)  # (N|1, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return torch.addcmul(self.beta, self.gamma, x * nx) + x

    def extra_repr(self) -> str:
        return f"dim={self.gamma.numel()}, eps={self.eps}, masked_pooling={self.masked_pooling}"
