"""Classic FPN (Lin et al. 2017) over a hierarchical backbone's stages, using ``torchvision.ops.FeaturePyramidNetwork``.

Used for ConvNeXt V2 (strides 4/8/16/32 → 256-channel maps at the same strides). The stride-64 level of
Mask R-CNN is added by the detector adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from mimlab.models.parts import Parts


class TorchvisionFPN(nn.Module):
    """``forward(features: list[(N, C_i, H/s_i, W/s_i)]) -> list[(N, out_channels, H/s_i, W/s_i)]`` (same strides)."""

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> TorchvisionFPN:
        """On every map of the backbone (its ``out_channels`` / ``out_strides``)."""
        bb = parts.backbone
        return cls(in_channels=list(bb.out_channels), in_strides=list(bb.out_strides), **settings)

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels)
        self.out_channels = [out_channels] * len(in_channels)
        self.out_strides = list(in_strides)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        return list(out.values())
