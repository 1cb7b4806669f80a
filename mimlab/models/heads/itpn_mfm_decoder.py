"""iTPN decoders for pixel MIM + masked feature modeling (MFM) with per-level heads.

The paper supervises **each pyramid level** (multi-stage supervision); the official code has no MFM, so the per-level
decoders are **our design** (see ``mimlab/targets/ema_teacher.py`` for what comes from the paper):

* ``pixels``: the official fused-pyramid ``ITPNPixelDecoder`` (all three levels → 512-d × 8 blocks → p²·3);
* ``s4`` / ``s8`` / ``s16``: one light decoder per level. The level's visible sub-tokens get ``LN(F) + Linear(F → E/r²)``
  and are concatenated per unit to E, masked units get the level's ``mask_token``, a fixed sin-cos position embedding is
  added, ``depth`` transformer blocks run over all L units, then ``LN + Linear(E → out_dim)`` predicts the teacher
  feature of every unit (the loss keeps the masked ones).

Input: the pyramid's masked ``Encoding`` (``pyramid = (P4, P8, P16)`` at K visible units). Output: dict of (N, L, ·).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.hivit import init_weights
from mimlab.models.heads.itpn_pixel_decoder import scatter_units
from mimlab.models.parts import Parts
from mimlab.models.pos_embed import sincos_2d_pos_embed
from mimlab.targets.ema_teacher import EMATeacherTarget

LEVELS = ("s4", "s8", "s16")


class LevelFeatureDecoder(nn.Module):
    """One pyramid level (N, K, r, r, F) at visible units -> (N, L, out_dim) predictions for all units."""

    def __init__(
        self,
        fpn_dim: int,
        sub: int,
        out_dim: int,
        embed_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        grid: tuple[int, int] = (14, 14),
    ) -> None:
        super().__init__()
        if embed_dim % (sub * sub):
            raise ValueError(f"decoder embed_dim {embed_dim} must be divisible by {sub * sub}")
        self.embed = nn.Sequential(nn.LayerNorm(fpn_dim, eps=1e-6), nn.Linear(fpn_dim, embed_dim // (sub * sub)))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(embed_dim, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))  # type: ignore[arg-type]
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pred = nn.Linear(embed_dim, out_dim)

    def forward(self, level: Tensor, ids_keep: Tensor | None) -> Tensor:
        num_units = self.pos_embed.shape[1]
        x = scatter_units(self.embed(level).flatten(2), ids_keep, num_units, self.mask_token) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class ITPNMFMDecoder(nn.Module):
    """Args: pixel_decoder (an ``ITPNPixelDecoder`` or None), fpn_dim, the per-unit target width of s4/s8/s16 as
    ``out_dims`` or as ``teacher_embed_dim`` (teacher D) + ``stages`` (teacher stage per level, as in the target:
    stage 0 gives 16·D/4 = 4D per unit, stage 1 gives 4·D/2 = 2D, stage 2 gives D), embed_dim/depth/num_heads of each
    level decoder, img_size/unit_size (grid)."""

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> ITPNMFMDecoder:
        """On the pyramid's width, predicting the EMA teacher's stages (its width is the backbone's)."""
        bb, teacher = parts.backbone, parts.require("target", EMATeacherTarget, "ITPNMFMDecoder")
        return cls(
            fpn_dim=parts.neck_width,
            img_size=parts.img_size,
            unit_size=bb.out_strides[-1],
            teacher_embed_dim=bb.num_features,
            stages=list(teacher.stages),
            **settings,
        )

    def __init__(
        self,
        out_dims: list[int] | tuple[int, int, int] | None = None,
        pixel_decoder: nn.Module | None = None,
        fpn_dim: int = 256,
        embed_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        img_size: int = 224,
        unit_size: int = 16,
        teacher_embed_dim: int | None = None,
        stages: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if out_dims is None:
            if teacher_embed_dim is None or stages is None:
                raise ValueError("ITPNMFMDecoder: give out_dims, or teacher_embed_dim and stages (= target.stages)")
            out_dims = [teacher_embed_dim * (4, 2, 1)[s] for s in stages]
        grid = (img_size // unit_size, img_size // unit_size)
        self.pixel_decoder = pixel_decoder
        self.level_decoders = nn.ModuleDict(
            {
                name: LevelFeatureDecoder(fpn_dim, sub, dim, embed_dim, depth, num_heads, mlp_ratio, grid)
                for name, sub, dim in zip(LEVELS, (4, 2, 1), out_dims)
            }
        )
        self.level_decoders.apply(init_weights)
        for dec in self.level_decoders.values():
            nn.init.normal_(dec.mask_token, std=0.02)  # type: ignore[arg-type]

    def forward(self, enc: Encoding, mask: Tensor | None = None) -> dict[str, Tensor]:
        out = {name: dec(level, enc.ids_keep) for (name, dec), level in zip(self.level_decoders.items(), enc.pyramid)}
        if self.pixel_decoder is not None:
            out["pixels"] = self.pixel_decoder(enc, mask)
        return out
