"""ViTDet simple feature pyramid (Li et al. 2022): strides 4/8/16/32 from a plain ViT's single stride-16 map.

Per level (``dim`` = ViT width D, ``out`` = ``out_channels``)::

    s4 : ConvT(D, D/2, 2, 2) → LN2d → GELU → ConvT(D/2, D/4, 2, 2)
    s8 : ConvT(D, D/2, 2, 2)
    s16: identity
    s32: MaxPool(2, 2)
    then Conv1×1(·, out, no bias) → LN2d → Conv3×3(out, out, no bias) → LN2d

The extra stride-64 level of Mask R-CNN is added by the detector adapter, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import nn


def _scale_stage(dim: int, scale: float) -> tuple[nn.Module, int]:
    """The resampling path for ``scale`` = source stride / output stride (ViTDet's 4, 2, 1, 0.5; 0.25 for patch-8 ViTs)."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, 2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale in (0.5, 0.25):
        k = int(round(1 / scale))
        return nn.MaxPool2d(k, k), dim
    raise ValueError(f"SimpleFeaturePyramid: output stride gives scale {scale} of the source map; supported: 4, 2, 1, 0.5, 0.25.")


class SimpleFeaturePyramid(nn.Module):
    """Multi-scale maps from the last (single-scale) backbone map.

    Args:
        in_channels: channels of the input maps (the backbone's ``out_channels``); the last one is used.
        in_strides: strides of the input maps; the last one is the source stride (16 for ViT-B/16).
        out_channels: width of every output level (256 in ViTDet).
        out_strides: output strides; each must be source stride × {1/4, 1/2, 1, 2, 4} (ViT-B/16: 4, 8, 16, 32).

    ``forward(features: list[(N, C_i, H/s_i, W/s_i)]) -> list[(N, out, H/s, W/s)]`` for ``s`` in ``out_strides``.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], out_channels: int = 256,
                 out_strides: Sequence[int] = (4, 8, 16, 32)):
        super().__init__()
        dim, stride = int(in_channels[-1]), int(in_strides[-1])
        self.stages = nn.ModuleList()
        for out_stride in out_strides:
            up, width = _scale_stage(dim, stride / out_stride)
            self.stages.append(nn.Sequential(
                up,
                nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)))
        self.out_channels = [out_channels] * len(out_strides)
        self.out_strides = [int(s) for s in out_strides]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = features[-1]
        return [stage(x) for stage in self.stages]
