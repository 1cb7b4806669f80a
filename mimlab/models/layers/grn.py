"""Global Response Normalization (ConvNeXt V2), with an optional mask for masked-dense FCMAE.

Reference: ConvNeXt-V2 ``models/utils.py`` (dense GRN) and the JAX masked-dense block in its
TRAINING.md; METHODS.md §3.2.
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

    ``mask``: optional ``(N, H, W, 1)`` float, ``1 = masked`` (MAE convention). When given, the
    L2 norm runs over the **visible** positions of each sample only (per-sample masked statistics,
    the dense equivalent of sparse convolution; MinkowskiGRN instead pools over every active point
    of the whole batch). The JAX reference puts ``eps`` inside the square root; we keep the dense
    code's plain norm so that ``mask`` of all zeros gives exactly the dense GRN. The output is
    computed at every position; callers zero the masked ones.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        visible = x if mask is None else x * (1.0 - mask)
        gx = torch.linalg.vector_norm(visible, ord=2, dim=(1, 2), keepdim=True)  # (N,1,1,C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return torch.addcmul(self.beta, self.gamma, x * nx) + x

    def extra_repr(self) -> str:
        return f"dim={self.gamma.numel()}, eps={self.eps}"
