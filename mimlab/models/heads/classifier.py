"""Image-level features from any backbone and the classifier heads of fine-tuning and linear probing.

Feature extractors take ``(backbone, images (N, C, H, W))`` and return ``(N, backbone.num_features)`` through the
backbone contract's ``forward_pooled``: ``PooledFeatures`` (the backbone's own readout, ``global_pool``),
``GlobalAvgPool`` ("avg": mean of the last map; MAE FT "global pool"), ``ClsToken`` ("cls": the final-normed cls
token; MAE linear probe). Heads take ``(N, D)`` features and return
``(N, num_classes)`` logits.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from mimlab.models.backbones.contract import check_pool


class PooledFeatures:
    """``backbone.forward_pooled(images, pool)``, (N, num_features); ``pool`` None (default) is the backbone's
    ``global_pool``, its default readout (the mean of the last map; ``cls`` only where a recipe asks for it)."""

    def __init__(self, pool: str | None = None) -> None:
        self.pool = pool

    def dim(self, backbone: nn.Module) -> int:
        """Feature width; raises if the backbone does not offer this pool."""
        check_pool(backbone, self.pool)
        return int(backbone.num_features)  # type: ignore[arg-type]

    def __call__(self, backbone: nn.Module, images: Tensor) -> Tensor:
        return backbone.forward_pooled(images, self.pool)  # type: ignore[operator]


class GlobalAvgPool(PooledFeatures):
    """The mean over the positions of the last map ("avg"; MAE fine-tuning's global pool)."""

    def __init__(self) -> None:
        super().__init__("avg")


class ClsToken(PooledFeatures):
    """The cls token after the final norm ("cls"; MAE's linear probe)."""

    def __init__(self) -> None:
        super().__init__("cls")


class PooledClassifierHead(nn.Module):
    """MAE / ConvNeXt V2 / iTPN fine-tuning head: ``fc_norm`` LayerNorm(eps 1e-6) then Linear.

    The Linear weight is trunc_normal(std ``init_std``) times ``init_scale`` (MAE 2e-5 and 1; ConvNeXt V2 head_init_scale 1e-3),
    bias 0. ``dropout`` is applied before the Linear (0 in every recipe here).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        init_std: float = 2e-5,
        init_scale: float = 1.0,
        dropout: float = 0.0,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.fc_norm = nn.LayerNorm(in_dim, eps=1e-6) if norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)
        trunc_normal_(self.fc.weight, std=init_std)
        nn.init.zeros_(self.fc.bias)
        with torch.no_grad():
            self.fc.weight.mul_(init_scale)

    def forward(self, features: Tensor) -> Tensor:
        """(N, D) -> (N, num_classes)."""
        return self.fc(self.drop(self.fc_norm(features)))


class LinearProbeHead(nn.Module):
    """MAE linear probe head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` then Linear (trunc_normal std 0.01, bias 0).

    The BN has no learnable parameters (only running statistics): it whitens the frozen features per channel.
    """

    def __init__(self, in_dim: int, num_classes: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(in_dim, num_classes)
        trunc_normal_(self.fc.weight, std=init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Tensor) -> Tensor:
        """(N, D) -> (N, num_classes)."""
        return self.fc(self.bn(features))
