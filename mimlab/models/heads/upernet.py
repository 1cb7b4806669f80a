"""UperNet decode head (Xiao et al. 2018) as used by MAE / BEiT / ConvNeXt V2 / iTPN on ADE20K (mmseg ``UPerHead``).

``forward(features: list[(N, C_i, H/s_i, W/s_i)]) -> (N, num_classes, H/s_0, W/s_0)`` logits at the finest stride::

    psp   = Conv3×3(cat[x_L, up(Conv1×1(AdaptiveAvgPool_k(x_L))) for k in pool_scales])    (PPM on the coarsest map)
    lat_i = Conv1×1(x_i) for i < L ; lat_L = psp ; top-down: lat_{i-1} += up(lat_i)
    out   = Conv3×3(cat[up(Conv3×3(lat_i)) for i < L] + [up(psp)]) → Dropout2d(0.1) → Conv1×1(num_classes)

Every Conv is Conv-BN-ReLU (``torchvision.ops.Conv2dNormActivation``); BN becomes SyncBN under DDP with
``trainer.sync_batchnorm``. Upsampling is bilinear, ``align_corners=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    """Args: in_channels per level, ``channels`` (512 in the paper configs; 768 for iTPN), ``num_classes`` (150)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 150,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        in_channels = list(in_channels)
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), Conv2dNormActivation(in_channels[-1], channels, 1))
            for s in pool_scales
        )
        self.ppm_bottleneck = Conv2dNormActivation(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(Conv2dNormActivation(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(Conv2dNormActivation(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = Conv2dNormActivation(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        psp = self.ppm_bottleneck(torch.cat([x] + [_up(p(x), x.shape[-2:]) for p in self.ppm], dim=1))
        laterals = [conv(f) for conv, f in zip(self.lateral, features[:-1])] + [psp]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _up(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn, laterals[:-1])] + [psp]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_up(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))
