"""A linear prediction per token, MaskFeat's head (github.com/facebookresearch/SlowFast ``MSSeparateHead`` without
decoder blocks: LayerNorm + Linear; the LayerNorm is the encoder's final norm here).

Input: the ``Encoding`` of an encoder that keeps every position (its ``map`` (N, C, h, w)). Output: (N, h·w, out_dim), row-major tokens, predicted for every token (the
loss keeps the masked ones). The token grid must be the mask-unit grid (MaskFeat masks single 16-px patches).
"""

from __future__ import annotations

from timm.layers import trunc_normal_
from torch import Tensor, nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.parts import Parts


class LinearTokenHead(nn.Module):
    """Args: in_channels (encoder width), out_dim (target width: 108 for MaskFeat's HOG of a 16-px patch).
    Init as the official head: truncated-normal(0.02) weight, zero bias."""

    @classmethod
    def attach(cls, parts: Parts) -> LinearTokenHead:
        """From the backbone's last width to the target's width (``Target.dim``)."""
        return cls(in_channels=parts.backbone.out_channels[-1], out_dim=parts.target_dim)

    def __init__(self, in_channels: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_dim)
        trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: Encoding, mask: Tensor | None = None) -> Tensor:
        """Encoding of every position (map (N, C, h, w)) -> (N, h·w, out_dim)."""
        return self.proj(features.map.flatten(2).transpose(1, 2))
