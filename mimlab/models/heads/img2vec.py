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

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mimlab.models.backbones.vit import ViTEncoding, _init_linear_and_norm
from mimlab.models.pos_embed import sincos_2d_pos_embed


class Img2VecDecoder(nn.Module):
    """``forward(features: ViTEncoding, mask (N, L)) -> {"tokens": (N, K_t, out_dim), "global": (N, out_dim)}``.

    ``features`` must come from a ``MaskedViT`` built with ``keep_hidden_states=True``: ``tokens``
    ``(N, 1 + V, D)`` (cls first, V visible patches), ``ids_restore`` ``(N, L_p)`` over the patch grid,
    ``hidden_states`` one ``(N, 1 + V, D)`` per block. ``mask`` is not needed (the unshuffle follows
    ``ids_restore``); it is accepted for the decoder contract. ``K_t = (H / out_stride) * (W / out_stride)``, row-major.

    Args:
        embed_dim: encoder width D.  out_dim: teacher channels (2048 for ResNet-50).
        img_size, patch_size: student geometry (fixes the patch grid and the decoder position embedding).
        out_stride: teacher stride; a multiple of ``patch_size``.
        decoder_dim, depth, num_heads, mlp_ratio: the transformer decoder (Img2Vec: depth 2 for ViT-B, 4 for ViT-L).
        proj_hidden_dim: hidden width of both projection MLPs (Linear -> ReLU -> Linear).
        multi_block: average all encoder blocks (True, Img2Vec) or decode the encoder output alone (ablation).
    """

    def __init__(self, embed_dim: int, out_dim: int, img_size: int = 224, patch_size: int = 16, out_stride: int = 32,
                 decoder_dim: int = 512, depth: int = 2, num_heads: int = 16, mlp_ratio: float = 4.0,
                 proj_hidden_dim: int = 2048, multi_block: bool = True) -> None:
        super().__init__()
        if out_stride % patch_size:
            raise ValueError(f"model.decoder.out_stride={out_stride} must be a multiple of patch_size={patch_size}")
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.pool = out_stride // patch_size
        if self.grid[0] % self.pool:
            raise ValueError(f"img_size={img_size} is not a multiple of model.decoder.out_stride={out_stride}")
        self.multi_block = multi_block
        self.aggregate_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_dim = decoder_dim
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, decoder_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.proj = Mlp(decoder_dim, proj_hidden_dim, out_dim, act_layer=nn.ReLU)
        self.global_proj = Mlp(embed_dim, proj_hidden_dim, out_dim, act_layer=nn.ReLU)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE init: fixed sin-cos pos-embed (zero cls row), normal(0.02) mask token, xavier Linear, unit LayerNorm."""
        self.decoder_pos_embed.data.copy_(sincos_2d_pos_embed(self.decoder_dim, self.grid, cls_token=True).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def aggregate(self, features: ViTEncoding) -> Tensor:
        """Multi-block feature: uniform mean of the encoder's block outputs (pre-norm), ``(N, 1 + V, D)``."""
        if not self.multi_block:
            return features.tokens
        if not features.hidden_states:
            raise ValueError("Img2VecDecoder(multi_block=True) needs model.backbone.keep_hidden_states=true")
        return torch.stack(features.hidden_states).mean(0)

    def forward(self, features: ViTEncoding, mask: Tensor | None = None) -> dict[str, Tensor]:
        if tuple(features.grid) != self.grid:
            raise ValueError(f"Img2VecDecoder was built for a {self.grid} patch grid but got {tuple(features.grid)}: "
                             "model.decoder.img_size must equal the training crop (data.img_size)")
        x = self.decoder_embed(self.aggregate_norm(self.aggregate(features)))
        n, num_patches = x.shape[0], features.ids_restore.shape[1]
        fill = self.mask_token.expand(n, num_patches + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, features.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, 1:]  # drop cls: (N, L_p, decoder_dim)
        if self.pool > 1:
            grid = x.transpose(1, 2).reshape(n, -1, *self.grid)
            x = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # (N, K_t, decoder_dim)
        visible_mean = features.tokens[:, 1:].mean(1)  # GAP over the visible student tokens
        return {"tokens": self.proj(x), "global": self.global_proj(visible_mean)}

