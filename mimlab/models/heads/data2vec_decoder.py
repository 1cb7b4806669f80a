"""data2vec 2.0 convolutional decoder (Baevski et al. 2022, arXiv 2212.07525; fairseq ``examples/data2vec/models/
modalities/modules.py`` ``Decoder2d`` with ``ModalitySpecificEncoder.decoder_input``).

1. visible encoder tokens go back to their grid positions; every masked position gets a fresh N(0, ``mask_noise_std``²)
   vector (no learned mask token, no position embedding);
2. ``depth`` layers of ``Conv2d(k, groups) → LayerNorm over channels (no affine, eps 1e-5) → GELU``, each added to its
   input when the channel counts match (always after the first layer);
3. a Linear back to the encoder width predicts the teacher target of every patch.

ViT-B recipe: 768-d, 6 layers, kernel 3, 16 groups (2.586 M parameters). PyTorch's default init, as the official
``reset_parameters``. Input: a :class:`~mimlab.models.backbones.contract.Encoding` of R mask rows (images × clones).
Output: ``{"tokens": (R, L, D) predictions for all L patches, "cls": (R, D) the encoder's cls output}`` (``"cls"`` only
when the encoder has a cls token). The loss keeps the masked patches.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.parts import Parts


def _conv_layer(in_dim: int, dim: int, kernel_size: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_dim, dim, kernel_size, padding=kernel_size // 2, groups=groups)]
    if kernel_size % 2 == 0:
        layers.append(nn.ZeroPad2d((0, -1, 0, -1)))  # even kernels grow the map by one: drop the last row and column
    layers += [LayerNorm2d(dim, eps=1e-5, affine=False), nn.GELU()]
    return nn.Sequential(*layers)


class Data2VecDecoder(nn.Module):
    """Args: embed_dim (encoder width D), decoder_dim (768), depth (6), kernel_size (3), groups (16),
    mask_noise_std (0.01, fairseq ``mask_noise_std``)."""

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> Data2VecDecoder:
        """From the backbone's token width."""
        return cls(embed_dim=parts.backbone.num_features, **settings)

    def __init__(
        self,
        embed_dim: int,
        decoder_dim: int = 768,
        depth: int = 6,
        kernel_size: int = 3,
        groups: int = 16,
        mask_noise_std: float = 0.01,
    ) -> None:
        super().__init__()
        if embed_dim % groups or decoder_dim % groups:
            raise ValueError(
                f"model.decoder.groups={groups} must divide embed_dim={embed_dim} and decoder_dim={decoder_dim}"
            )
        self.mask_noise_std = mask_noise_std
        self.blocks = nn.ModuleList(
            _conv_layer(embed_dim if i == 0 else decoder_dim, decoder_dim, kernel_size, groups) for i in range(depth)
        )
        self.proj = nn.Linear(decoder_dim, embed_dim)

    def fill(self, features: Encoding) -> Tensor:
        """(R, P+K, D) encoding -> (R, D, gh, gw) map: visible tokens at their positions, noise elsewhere."""
        visible = features.tokens[:, features.num_prefix_tokens :]
        rows, length = features.restore.shape
        noise = (
            torch.randn(rows, length - visible.shape[1], visible.shape[2], device=visible.device, dtype=visible.dtype)
            * self.mask_noise_std
        )
        x = torch.cat([visible, noise], dim=1)
        x = torch.gather(x, 1, features.restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return x.transpose(1, 2).reshape(rows, -1, *features.grid)

    def forward(self, features: Encoding, mask: Tensor | None = None) -> dict[str, Tensor]:
        x = self.fill(features)
        for block in self.blocks:
            y = block(x)
            x = y + x if y.shape[1] == x.shape[1] else y
        out = {"tokens": self.proj(x.flatten(2).transpose(1, 2))}
        if features.num_prefix_tokens:
            out["cls"] = features.tokens[:, 0]
        return out
