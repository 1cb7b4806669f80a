"""Img2Vec decoder head: multi-block aggregation -> light transformer decoder -> teacher-grid projection.

Two outputs, one per loss of ``mimlab.losses.img2vec``:

* ``tokens``: the mean of all encoder block outputs (multi-block feature learning) is layer-normed,
  embedded to ``decoder_dim``, completed with mask tokens (MAE unshuffle with ``ids_restore``), given a
  fixed 2-D sin-cos position embedding, run through ``depth`` timm ``Block``s, average-pooled from the
  student patch grid to the teacher grid (``out_stride / patch_size`` patches per side: 2x2 for a
  stride-32 ResNet teacher and a ViT/16 student, i.e. one 32-px mask unit per teacher token) and mapped by
  a projection MLP with ReLU to the teacher's channel count ``out_dim``.
* ``global``: the global-average-pool of the visible tokens of the encoder output (after its final
  norm, like ViT GAP), mapped to ``out_dim`` by a second projection MLP with ReLU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.vit import MaskedViT, _init_linear_and_norm
from mimlab.models.heads.mae_decoder import MAEDecoder
from mimlab.models.parts import CompositionError, Parts
from mimlab.targets.frozen_teacher import FrozenTeacher


class Img2VecDecoder(nn.Module):
    """``forward(features: Encoding, mask (N, L)) -> {"tokens": (N, K_t, out_dim), "global": (N, out_dim)}``.

    ``features`` must come from a ``MaskedViT`` that keeps every block (``keep_hidden="all"``; ``attach`` asks): ``tokens``
    ``(N, 1 + V, D)`` (cls first, V visible patches), ``ids_restore`` ``(N, L_p)`` over the patch grid,
    ``hidden`` one ``(N, 1 + V, D)`` per block. ``mask`` is not needed (the unshuffle follows
    ``ids_restore``); it is accepted for the decoder contract. ``K_t = (H / out_stride) * (W / out_stride)``, row-major.

    Args:
        embed_dim: encoder width D.  out_dim: teacher channels (2048 for ResNet-50).
        img_size, patch_size: student geometry (fixes the patch grid and the decoder position embedding).
        out_stride: teacher stride; a multiple of ``patch_size``.
        decoder_dim, depth, num_heads, mlp_ratio: the transformer decoder (Img2Vec: depth 2 for ViT-B, 4 for ViT-L).
        proj_hidden_dim: hidden width of both projection MLPs (Linear -> ReLU -> Linear).
        multi_block: average all encoder blocks (True, Img2Vec) or decode the encoder output alone (ablation).
    """

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> Img2VecDecoder:
        """From the backbone (width, patch stride, input size) and the frozen teacher (its width and stride); with
        ``multi_block`` the ViT is asked to return every block's output."""
        bb, teacher = parts.backbone, parts.require("target", FrozenTeacher, "Img2VecDecoder")
        if teacher.stride is None:
            raise CompositionError("Img2VecDecoder pools to the teacher's grid: set target.stride")
        decoder = cls(
            embed_dim=bb.out_channels[-1],
            out_dim=parts.target_dim,
            img_size=parts.img_size,
            patch_size=bb.out_strides[-1],
            out_stride=teacher.stride,
            **settings,
        )
        if decoder.multi_block:
            parts.require("backbone", MaskedViT, "Img2VecDecoder(multi_block=True)").request_hidden("all")
        return decoder

    def __init__(
        self,
        embed_dim: int,
        out_dim: int,
        img_size: int = 224,
        patch_size: int = 16,
        out_stride: int = 32,
        decoder_dim: int = 512,
        depth: int = 2,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        proj_hidden_dim: int = 2048,
        multi_block: bool = True,
    ) -> None:
        super().__init__()
        if out_stride % patch_size:
            raise ValueError(f"model.decoder.out_stride={out_stride} must be a multiple of patch_size={patch_size}")
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.pool = out_stride // patch_size
        if self.grid[0] % self.pool:
            raise ValueError(f"img_size={img_size} is not a multiple of model.decoder.out_stride={out_stride}")
        self.multi_block = multi_block
        self.aggregate_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder = MAEDecoder(
            embed_dim, img_size, patch_size, decoder_dim, depth, num_heads, mlp_ratio, with_prediction=False
        )
        self.proj = Mlp(decoder_dim, proj_hidden_dim, out_dim, act_layer=nn.ReLU)
        self.global_proj = Mlp(embed_dim, proj_hidden_dim, out_dim, act_layer=nn.ReLU)
        for module in (self.aggregate_norm, self.proj, self.global_proj):
            module.apply(_init_linear_and_norm)

    def aggregate(self, features: Encoding) -> Tensor:
        """Multi-block feature: uniform mean of the encoder's block outputs (pre-norm), ``(N, 1 + V, D)``."""
        if not self.multi_block:
            return features.tokens
        if not features.hidden:
            raise ValueError(
                "Img2VecDecoder(multi_block=True) needs every block's output: model.backbone.keep_hidden=all"
            )
        return torch.stack(list(features.hidden.values())).mean(0)

    def forward(self, features: Encoding, mask: Tensor | None = None) -> dict[str, Tensor]:
        if tuple(features.grid) != self.grid:
            raise ValueError(
                f"Img2VecDecoder was built for a {self.grid} patch grid but got {tuple(features.grid)}: "
                "model.decoder.img_size must equal the training crop (data.img_size)"
            )
        n = features.tokens.shape[0]
        x = self.decoder.decode(self.aggregate_norm(self.aggregate(features)), features.restore)  # (N, L_p, dim)
        if self.pool > 1:
            grid = x.transpose(1, 2).reshape(n, -1, *self.grid)
            x = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # (N, K_t, decoder_dim)
        visible_mean = features.tokens[:, 1:].mean(1)  # GAP over the visible student tokens
        return {"tokens": self.proj(x), "global": self.global_proj(visible_mean)}
