"""ViTDet simple feature pyramid (Li et al. 2022): strides 4/8/16/32 from a plain ViT's single map, any patch size.

The source is the backbone's last map at its declared stride ``p`` (``backbone.out_strides[-1]``). Each output stride
``s`` is reached with ViTDet's resampling for the scale ``p / s`` (``dim`` = ViT width D, ``out`` = ``out_channels``)::

    scale 4  : ConvT(D, D/2, 2, 2) → LN2d → GELU → ConvT(D/2, D/4, 2, 2)      (ViT-B/16 → s4)
    scale 2  : ConvT(D, D/2, 2, 2)                                          (ViT-B/16 → s8)
    scale 1  : identity                                                     (ViT-B/16 → s16)
    scale 1/k: MaxPool(k, k), k = 2, 4, 8, ...                              (ViT-B/16 → s32; patch 4/8 → coarser levels)
    then Conv1×1(·, out, no bias) → LN2d → Conv3×3(out, out, no bias) → LN2d

ViTDet defines the scales 4, 2, 1, 1/2 for patch 16; coarser pools serve patch-4 and patch-8 ViTs. A patch size that is
not a power of two (ViT-H/14) is first resampled bilinearly to the nearest power-of-two stride (14 → 16, map
``ceil(h·14/16)``), so that every output sits on the stride-``s`` grid the heads expect. The extra stride-64 level of
Mask R-CNN is added by the detector adapter, not here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from mimlab.models.parts import Parts


def _scale_stage(dim: int, scale: float) -> tuple[nn.Module, int]:
    """The resampling path for ``scale`` = source stride / output stride, and its output width."""
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, 2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
        ), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, 2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    k = round(1 / scale)
    if scale < 1 and k & (k - 1) == 0:
        return nn.MaxPool2d(k, k), dim
    raise ValueError(
        f"SimpleFeaturePyramid: an output stride {1 / scale:g}x the source stride cannot be built; the "
        f"source (backbone) stride must lie between output stride / 4 and the coarsest output stride."
    )


def power_of_two_stride(stride: int) -> int:
    """The power of two nearest to ``stride`` in log scale (16 for 14, 8 for 8)."""
    return 2 ** round(math.log2(stride))


class SimpleFeaturePyramid(nn.Module):
    """Multi-scale maps from the last (single-scale) backbone map.

    Args:
        in_channels: channels of the input maps (the backbone's ``out_channels``); the last one is used.
        in_strides: strides of the input maps (the backbone's ``out_strides``); the last one is the source stride.
        out_channels: width of every output level (256 in ViTDet).
        out_strides: output strides (4, 8, 16, 32 for Mask R-CNN and UperNet).

    ``forward(features: list[(N, C_i, H/s_i, W/s_i)]) -> list[(N, out, H/s, W/s)]`` for ``s`` in ``out_strides``.
    """

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> SimpleFeaturePyramid:
        """On the backbone's last map (its ``out_channels`` / ``out_strides``)."""
        bb = parts.backbone
        return cls(in_channels=list(bb.out_channels), in_strides=list(bb.out_strides), **settings)

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        out_channels: int = 256,
        out_strides: Sequence[int] = (4, 8, 16, 32),
    ):
        super().__init__()
        dim, self.in_stride = int(in_channels[-1]), int(in_strides[-1])
        self.source_stride = power_of_two_stride(self.in_stride)
        self.stages = nn.ModuleList()
        for out_stride in out_strides:
            up, width = _scale_stage(dim, self.source_stride / out_stride)
            self.stages.append(
                nn.Sequential(
                    up,
                    nn.Conv2d(width, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )
        self.out_channels = [out_channels] * len(out_strides)
        self.out_strides = [int(s) for s in out_strides]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = features[-1]
        if self.source_stride != self.in_stride:
            ratio = self.in_stride / self.source_stride
            size = [math.ceil(n * ratio) for n in x.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return [stage(x) for stage in self.stages]
