"""Histograms of oriented gradients per patch, MaskFeat's target (Wei et al., arXiv 2112.09133;
github.com/facebookresearch/SlowFast ``slowfast/models/operators.py`` ``HOGLayerC`` and ``masked.py``).

Per colour channel of the (normalised) image: Sobel gradients ``gx``, ``gy`` (reflect padding 1), magnitude
``sqrt(gx² + gy²)``, orientation ``atan2(gx, gy)`` quantised into ``nbins`` unsigned bins (``floor(angle / π · nbins)
mod nbins``), magnitudes summed per bin over ``cell_size × cell_size`` cells, each cell's histogram L2-normalised
(per channel). A patch's target concatenates its ``(patch_size / cell_size)²`` cells for the three channels in the
official order ``(channel, bin, cell_row, cell_col)``: 3 · 9 · 2 · 2 = 108 values for 16-px patches and 8-px cells.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mimlab.models.parts import Parts
from mimlab.targets.base import Target


class HOGTarget(Target):
    """Target (N, L, ``dim``) over the ``patch_size``-pixel patch grid (the mask-unit grid); the mask is not needed
    (the loss keeps masked patches). ``dim = in_chans · nbins · cells_per_side²`` (108 for MaskFeat's 2 x 2 cells).

    The cell follows the patch: ``cell_size = patch_size / cells_per_side`` (MaskFeat: 8-px cells on 16-px patches,
    so 4-px cells on 8-px patches), unless ``cell_size`` is given in pixels."""

    def __init__(
        self,
        patch_size: int = 16,
        cell_size: int | None = None,
        nbins: int = 9,
        in_chans: int = 3,
        cells_per_side: int = 2,
    ) -> None:
        super().__init__()
        if cell_size is None:
            if patch_size % cells_per_side:
                raise ValueError(
                    f"target.patch_size={patch_size} px does not split into target.cells_per_side={cells_per_side} "
                    "cells per side; use a patch size divisible by it"
                )
            cell_size = patch_size // cells_per_side
        if patch_size % cell_size:
            raise ValueError(f"target.patch_size={patch_size} must be a multiple of target.cell_size={cell_size}")
        self.patch_size, self.cell_size, self.nbins, self.in_chans = patch_size, cell_size, nbins, in_chans
        self.dim = in_chans * nbins * (patch_size // cell_size) ** 2
        sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("sobel", torch.stack([sobel_x, sobel_x.T]).unsqueeze(1), persistent=False)  # (2, 1, 3, 3)

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> HOGTarget:
        """Histograms per mask unit (``patch_size = masking.unit_size``)."""
        return cls(patch_size=parts.unit_size, **settings)

    @torch.no_grad()
    def cell_histograms(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, nbins, H / cell_size, W / cell_size), each histogram L2-normalised, float32 (also
        under autocast: bf16 gradients would move orientations across bin edges)."""
        device = images.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self.cell_histograms(images)
        n, c, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by target.patch_size={self.patch_size}")
        x = F.pad(images.float().reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
        gx, gy = F.conv2d(x, self.sobel.float()).unbind(1)  # type: ignore[arg-type]
        magnitude = torch.sqrt(gx**2 + gy**2)
        bins = torch.floor(torch.atan2(gx, gy) / math.pi * self.nbins).long() % self.nbins
        hist = torch.zeros(n * c, self.nbins, h, w, device=images.device).scatter_add_(
            1, bins[:, None], magnitude[:, None]
        )
        k = self.cell_size
        hist = hist.reshape(n, c, self.nbins, h // k, k, w // k, k).sum(dim=(4, 6))
        return F.normalize(hist, dim=2)

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """(N, C, H, W) -> (N, L, dim), L = (H / patch_size) · (W / patch_size) row-major."""
        hist = self.cell_histograms(images)
        n, c, b, hc, wc = hist.shape
        k = self.patch_size // self.cell_size
        hist = hist.reshape(n, c, b, hc // k, k, wc // k, k).permute(0, 3, 5, 1, 2, 4, 6)
        return hist.reshape(n, (hc // k) * (wc // k), c * b * k * k)
