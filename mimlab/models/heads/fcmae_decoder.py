"""FCMAE decoder: 1x1 proj -> mask token -> ConvNeXt V2 block(s) -> 1x1 pred (ConvNeXt-V2 ``models/fcmae.py``).

docs/methods.md §3.3: ``proj`` C_in -> 512, the learned mask token (1, 512, 1, 1) replaces masked positions,
``depth`` dense ConvNeXt V2 blocks at width 512 (k7, GRN), ``pred`` 512 -> patch_size² · 3 = 3072. No pos-embed.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.convnextv2 import ConvNeXtV2Block, mask_to_map
from mimlab.models.parts import Parts

__all__ = ["FCMAEDecoder"]


class FCMAEDecoder(nn.Module):
    """Predict pixels of every mask unit from the last encoder stage.

    ``forward(features, mask)``: ``features`` the encoding of every position (its ``map`` (N, in_channels, gh, gw): one
    position per mask unit, stride 32, 32-px units);
    ``mask`` (N, gh*gw), 1 = masked. Returns ``(N, gh*gw, out_dim)`` with ``out_dim = patch_size² · in_chans``,
    ordered like ``mimlab.models.patchify`` (row-in-patch, col-in-patch, channel), so it is compared directly
    with ``NormPixTarget(patch_size)``; the loss keeps masked units only.
    """

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> FCMAEDecoder:
        """From the backbone's last width and input channels; predicts one mask unit (``masking.unit_size``) per
        location."""
        bb = parts.backbone
        return cls(in_channels=bb.out_channels[-1], patch_size=parts.unit_size, in_chans=bb.in_chans, **settings)

    def __init__(
        self,
        in_channels: int,
        embed_dim: int = 512,
        depth: int = 1,
        patch_size: int = 32,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, 1, 1))
        self.decoder = nn.ModuleList(ConvNeXtV2Block(embed_dim) for _ in range(depth))
        self.pred = nn.Conv2d(embed_dim, patch_size**2 * in_chans, kernel_size=1)
        self.apply(self._init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)  # type: ignore[arg-type]

    def forward(self, features: Encoding, mask: torch.Tensor) -> torch.Tensor:
        x = features.map
        gh, gw = x.shape[-2:]
        if mask.shape[1] != gh * gw:
            raise ValueError(
                f"FCMAEDecoder: mask has {mask.shape[1]} units but the encoder map is {gh}x{gw}; "
                "FCMAE needs one mask unit per stride-32 position (masking.unit_size=32)"
            )
        x = self.proj(x)
        m = mask_to_map(mask.to(x.dtype), (gh, gw), (gh, gw))
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        for block in self.decoder:
            x = block(x)
        x = self.pred(x)  # (N, out_dim, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (N, L, out_dim)
