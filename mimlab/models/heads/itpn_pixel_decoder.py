"""iTPN pixel decoder (docs/methods.md §4.3): fuses all three pyramid levels per mask unit, then an MAE decoder.

Input: the pyramid's masked ``Encoding`` with ``pyramid = (P4 (N,K,4,4,F), P8 (N,K,2,2,F), P16 (N,K,1,1,F))`` at the
``K`` visible units (``ids_keep``). Per level ``decoder_embed[i] = LN(F) + Linear(F → E/r²)`` is applied to every
sub-token and the ``r×r`` sub-tokens of a unit are concatenated to ``E`` (index 0 = P16, 1 = P8, 2 = P4, as in the
official code). Each level is scattered onto the full unit grid with the shared ``mask_token`` at masked units, and

    x = level16 + decoder_pos_embed (fixed sin-cos) + level8 + level4  ->  blocks  ->  LN  ->  Linear(E → p²·3)

Output: (N, L, p²·3) pixel predictions for every unit (the loss keeps the masked ones; 1 = masked).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.hivit import init_weights
from mimlab.models.parts import Parts
from mimlab.models.pos_embed import sincos_2d_pos_embed


def scatter_units(x: Tensor, ids_keep: Tensor | None, num_units: int, fill: Tensor) -> Tensor:
    """(N, K, E) rows at unit indices ``ids_keep`` (N, K) -> (N, L, E) with ``fill`` (1, 1, E) elsewhere."""
    if ids_keep is None:
        return x
    full = fill.to(x.dtype).expand(x.shape[0], num_units, -1)
    return full.scatter(1, ids_keep[:, :, None].expand(-1, -1, x.shape[-1]), x)


class LevelFusion(nn.Module):
    """Per-level ``LN(F) + Linear(F → out_dim/r²)``; returns the list of per-unit (N, K, out_dim) embeddings.

    Levels are consumed in the official order (P16, P8, P4). ``num_levels`` ≤ 3.
    """

    def __init__(self, fpn_dim: int, out_dim: int, num_levels: int = 3) -> None:
        super().__init__()
        if out_dim % 16:
            raise ValueError(f"iTPN level fusion needs out_dim divisible by 16, got {out_dim}")
        self.decoder_embed = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(fpn_dim, eps=1e-6), nn.Linear(fpn_dim, out_dim // 4**i))
            for i in range(num_levels)
        )

    def forward(self, levels_by_stride: tuple[Tensor, ...]) -> list[Tensor]:
        coarse_first = list(reversed(levels_by_stride))  # (P16, P8, P4)
        return [emb(f).flatten(2) for emb, f in zip(self.decoder_embed, coarse_first)]


class ITPNPixelDecoder(nn.Module):
    """Args: fpn_dim (pyramid width F), embed_dim/depth/num_heads (512/8/16 official), img_size/patch_size (grid),
    num_levels (pyramid levels fused, 3), out_dim (default patch_size² · in_chans = 768)."""

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> ITPNPixelDecoder:
        """On the pyramid's width; one HiViT unit (the backbone's last stride) per token of its input size."""
        bb = parts.backbone
        return cls(fpn_dim=parts.neck_width, img_size=parts.img_size, patch_size=bb.out_strides[-1], **settings)

    def __init__(
        self,
        fpn_dim: int = 256,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_levels: int = 3,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.embed = LevelFusion(fpn_dim, embed_dim, num_levels)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d_pos_embed(embed_dim, self.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))  # type: ignore[arg-type]
            for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(embed_dim, out_dim or patch_size**2 * in_chans)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, enc: Encoding, mask: Tensor | None = None) -> Tensor:
        """Pyramid encoding at K visible units -> (N, L, out_dim) for all L units."""
        num_units = enc.grid[0] * enc.grid[1]
        levels = [scatter_units(x, enc.ids_keep, num_units, self.mask_token) for x in self.embed(enc.pyramid)]
        pos = self.decoder_pos_embed
        if pos.shape[1] != num_units:
            raise ValueError(
                f"ITPNPixelDecoder was built for a {self.grid} grid but got {num_units} units; "
                "set model.decoder.img_size to the data resolution"
            )
        x = levels[0] + pos
        for lvl in levels[1:]:
            x = x + lvl
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))
