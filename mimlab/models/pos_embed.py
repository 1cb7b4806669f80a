"""Fixed 2-D sine-cosine position embeddings (MAE ``util/pos_embed.py`` convention).

The first half of the channels encodes the **w** (column) coordinate and the second half the **h** (row)
coordinate; each half is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_k = 1 / 10000^(k / (D/4))``.
Computed in float64 and returned as float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, dim) with ``[sin, cos]`` halves."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_pos_embed(dim: int, grid: int | tuple[int, int], cls_token: bool = False) -> Tensor:
    """Return (gh*gw [+1], dim) float32; row-major over the grid; an all-zero first row if ``cls_token``."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
