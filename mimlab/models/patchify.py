"""MAE patch layout: images <-> sequences of flattened patches.

A patch is flattened in (row-in-patch, col-in-patch, channel) order with the channel fastest,
exactly as ``einsum('nchpwq->nhwpqc')`` in the official MAE / ConvNeXt-V2 / iTPN code.
"""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, L, p*p*C) with L = (H/p)*(W/p) in row-major patch order."""
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int] | None = None, channels: int = 3) -> Tensor:
    """(N, L, p*p*C) -> (N, C, gh*p, gw*p); the exact inverse of :func:`patchify`. ``grid`` defaults to square."""
    n, length, _ = patches.shape
    p = patch_size
    if grid is None:
        side = int(round(length**0.5))
        if side * side != length:
            raise ValueError(f"cannot infer a square grid from {length} patches; pass grid=(gh, gw)")
        grid = (side, side)
    gh, gw = grid
    x = patches.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)
