"""Image-level features from any backbone and the classifier heads of fine-tuning and linear probing.

Feature extractors take ``(backbone, images (N, C, H, W))`` and return ``(N, D)``:
``GlobalAvgPool`` averages the last map of ``backbone.forward_features`` (any backbone; MAE FT "global pool"),
``ClsToken`` takes the final-normed cls token of ``backbone.forward_tokens`` (ViT; MAE linear probe).
Heads take ``(N, D)`` features and return ``(N, num_classes)`` logits.
"""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn


class GlobalAvgPool:
    """Mean over the spatial positions of the last ``forward_features`` map: (N, C, h, w) -> (N, C)."""

    def dim(self, backbone: nn.Module) -> int:
        return int(backbone.out_channels[-1])

    def __call__(self, backbone: nn.Module, images: Tensor) -> Tensor:
        return backbone.forward_features(images)[-1].mean(dim=(2, 3))


class ClsToken:
    """The cls token after the final norm, ``backbone.forward_tokens(x)[:, 0]`` (ViT): (N, D)."""

    def dim(self, backbone: nn.Module) -> int:
        return int(backbone.embed_dim)

    def __call__(self, backbone: nn.Module, images: Tensor) -> Tensor:
        if not hasattr(backbone, "forward_tokens"):
            raise TypeError(f"{type(backbone).__name__} has no cls token (forward_tokens); use "
                            "mimlab.models.heads.classifier.GlobalAvgPool as the feature extractor")
        return backbone.forward_tokens(images)[:, 0]


class PooledClassifierHead(nn.Module):
    """MAE / ConvNeXt V2 / iTPN fine-tuning head: ``fc_norm`` LayerNorm(eps 1e-6) then Linear.

    The Linear weight is trunc_normal(std ``init_std``) times ``init_scale`` (MAE 2e-5 and 1; ConvNeXt V2 head_init_scale 1e-3),
    bias 0. ``dropout`` is applied before the Linear (0 in every recipe here).
    """

    def __init__(self, in_dim: int, num_classes: int, init_std: float = 2e-5, init_scale: float = 1.0,
                 dropout: float = 0.0, norm: bool = True) -> None:
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
