"""Auxiliary FCN head (mmseg ``FCNHead``; UperNet recipes attach it to the stride-16 level with loss weight 0.4).

``forward(features: list[(N, C_i, H_i, W_i)]) -> (N, num_classes, H_k, W_k)`` on ``features[in_index]``:
``num_convs`` × Conv3×3-BN-ReLU → Dropout2d(0.1) → Conv1×1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation


class FCNHead(nn.Module):
    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 150,
        channels: int = 256,
        in_index: int = 2,
        num_convs: int = 1,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.in_index = in_index
        c_in = list(in_channels)[in_index]
        self.convs = nn.Sequential(
            *[Conv2dNormActivation(c_in if i == 0 else channels, channels, 3) for i in range(num_convs)]
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels if num_convs else c_in, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(features[self.in_index])))
