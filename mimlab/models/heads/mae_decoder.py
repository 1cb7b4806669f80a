"""MAE decoder: embed visible tokens, append mask tokens, unshuffle, add fixed sin-cos pos-embed, transformer, predict.

Input: a :class:`~mimlab.models.backbones.contract.Encoding` (cls + K visible tokens). Output: (N, L, out_dim)
predictions for **every** patch (the loss keeps the masked ones). The cls token passes through the decoder and is
dropped at the end, as in the official code.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.vit import _init_linear_and_norm
from mimlab.models.parts import Parts
from mimlab.models.pos_embed import sincos_2d_pos_embed


class MAEDecoder(nn.Module):
    """Args: in_dim (encoder width), embed_dim/depth/num_heads (512/8/16 in MAE), img_size and patch_size (grid),
    out_dim (defaults to patch_size**2 * in_chans, i.e. 768 for p16 / 588 for p14). ``with_prediction=False`` drops
    ``decoder_pred`` for heads that only need :meth:`decode` (e.g. Img2Vec's feature head)."""

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> MAEDecoder:
        """Decode the backbone's final tokens: ``in_dim``, ``patch_size`` (its last width, stride), ``img_size``."""
        bb = parts.backbone
        return cls(in_dim=bb.out_channels[-1], img_size=parts.img_size, patch_size=bb.out_strides[-1], **settings)

    def __init__(
        self,
        in_dim: int,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        out_dim: int | None = None,
        with_prediction: bool = True,
    ) -> None:
        super().__init__()
        self.grid = (img_size // patch_size, img_size // patch_size)
        num_patches = self.grid[0] * self.grid[1]
        self.embed_dim = embed_dim
        self.decoder_embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)  # type: ignore[arg-type]
            for _ in range(depth)
        )
        self.decoder_norm = norm_layer(embed_dim)
        self.decoder_pred = (
            nn.Linear(embed_dim, out_dim or patch_size**2 * in_chans) if with_prediction else nn.Identity()
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.decoder_pos_embed.data.copy_(sincos_2d_pos_embed(self.embed_dim, self.grid, cls_token=True).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def decode(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """(N, 1+K, D_enc) cls + visible tokens, (N, L) unshuffle indices -> (N, L, embed_dim) normed features of
        every patch (mask tokens filled in at masked positions; the cls output is dropped)."""
        x = self.decoder_embed(tokens)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)[:, 1:]

    def forward(self, enc: Encoding, mask: Tensor | None = None) -> Tensor:
        """(N, 1+K, D_enc) encoding -> (N, L, out_dim) predictions for all L patches."""
        return self.decoder_pred(self.decode(enc.tokens, enc.restore))
