"""Tiny stand-in backbones that follow the backbone contract (for the dense-transfer tests only)."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn


class TinyViT(nn.Module):
    """Single-scale stand-in: patch 16, ``blocks.i`` naming, ``forward_features -> [(N, D, H/16, W/16)]``."""

    def __init__(self, dim: int = 32, depth: int = 2, patch: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(Block(dim, 2) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_channels, self.out_strides = [dim], [patch]

    def forward_features(self, x, mask=None):
        x = self.patch_embed(x)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            t = blk(t)
        return [self.norm(t).transpose(1, 2).reshape(n, c, h, w)]


class TinyPyramidNet(nn.Module):
    """Hierarchical stand-in (ConvNeXt-like naming ``stages.s.j``): strides 4/8/16/32, widths ``dims``."""

    def __init__(self, dims=(8, 16, 24, 32)):
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 4, 4)
        self.downsample = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], 2, 2) for i in range(3))
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GELU()) for d in dims)
        self.out_channels, self.out_strides = list(dims), [4, 8, 16, 32]

    def forward_features(self, x, mask=None):
        outs, x = [], self.stem(x)
        for i, stage in enumerate(self.stages):
            if i:
                x = self.downsample[i - 1](x)
            x = stage(x)
            outs.append(x)
        return outs


class TinyPyramidNeck(nn.Module):
    """Stand-in for a *pre-trained* pyramid neck (iTPN-like): s4/s8/s16 inputs → ``width``-channel maps."""

    def __init__(self, in_channels=(8, 16, 24), width: int = 16):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.out_channels, self.out_strides = [width] * 3, [4, 8, 16]

    def forward(self, features):
        return [p(f) for p, f in zip(self.proj, features[:3])]
