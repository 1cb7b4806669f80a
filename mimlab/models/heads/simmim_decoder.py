"""SimMIM's one-layer prediction head (github.com/microsoft/SimMIM ``models/simmim.py``): a 1x1 convolution to
``stride² · 3`` channels and ``PixelShuffle(stride)`` back to image resolution.

Input: the ``Encoding`` of a mask-token encoder (every position encoded; its ``map`` (N, C, H/s, W/s)). Output: the predicted
image, patchified over the ``unit_size``-pixel mask units, (N, L_units, unit_size² · 3), in
:mod:`mimlab.models.patchify` order, so it is compared with ``NormPixTarget(unit_size, norm_pix=False)`` on masked units.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.parts import Parts
from mimlab.models.patchify import patchify


class SimMIMDecoder(nn.Module):
    """Args: in_channels (encoder width: 768 for ViT-B, 1024 for Swin-B), encoder_stride (16 for ViT-B/16, 32 for
    Swin), unit_size (the mask unit, 32), in_chans (3). Parameters: ``in_channels · stride² · 3 + stride² · 3``."""

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> SimMIMDecoder:
        """From the backbone's last width and stride (16 for ViT-B/16, 32 for Swin) and the mask unit."""
        bb = parts.backbone
        return cls(
            in_channels=bb.out_channels[-1],
            encoder_stride=bb.out_strides[-1],
            unit_size=parts.unit_size,
            in_chans=bb.in_chans,
            **settings,
        )

    def __init__(self, in_channels: int, encoder_stride: int, unit_size: int, in_chans: int = 3) -> None:
        super().__init__()
        self.unit_size = unit_size
        self.decoder = nn.Sequential(
            nn.Conv2d(in_channels, encoder_stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )

    def forward(self, features: Encoding, mask: Tensor | None = None) -> Tensor:
        """Encoding of every position (map (N, C, h, w)) -> (N, L_units, unit_size² · in_chans); ``mask`` is not
        needed (the loss selects units)."""
        return patchify(self.decoder(features.map), self.unit_size)
