"""I-JEPA predictor (Assran et al. 2023, arXiv 2301.08243; facebookresearch/ijepa ``src/models/vision_transformer.py``
``VisionTransformerPredictor``): a narrow ViT that predicts the target encoder's tokens of each target block from the
context tokens, conditioned on the target positions.

For every mask row and every target block t (K_t units):
``[embed(context) + pos(context units) ; mask_token + pos(target units of block t)]`` → ``depth`` pre-norm timm
blocks → LayerNorm → the last K_t tokens → Linear back to the encoder width. Position embeddings are the fixed 2-D
sin-cos table of the predictor width (no cls row). Blocks are run on the R·T sequences at once.

Input: the context encoding (:class:`~mimlab.models.backbones.contract.Encoding`, visible = context units, ascending)
and the :class:`~mimlab.masking.MaskSet` with ``targets`` (R, T, K_t). Output: (R, T, K_t, D) predictions.
ViT-H/14 recipe: predictor width 384, depth 12, 16 heads (22.378 M parameters with its fixed position table).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mimlab.masking import MaskSet
from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.vit import MaskedViT, _init_trunc_normal
from mimlab.models.parts import Parts
from mimlab.models.pos_embed import sincos_2d_pos_embed


class IJEPAPredictor(nn.Module):
    """Args: embed_dim (encoder width), img_size / patch_size (fix the position grid), predictor_dim (384), depth,
    num_heads (the encoder's head count, as the official ``init_model``), mlp_ratio, init_std (0.02)."""

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> IJEPAPredictor:
        """From the ViT encoder (width, patch, input size) with its number of heads (the official predictor's)."""
        vit = parts.require("backbone", MaskedViT, "IJEPAPredictor")
        return cls(
            embed_dim=vit.embed_dim,
            img_size=parts.img_size,
            patch_size=vit.patch_size,
            num_heads=vit.num_heads,
            **settings,
        )

    def __init__(
        self,
        embed_dim: int,
        img_size: int = 224,
        patch_size: int = 16,
        predictor_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.grid = (img_size // patch_size, img_size // patch_size)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.predictor_embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        self.predictor_pos_embed = nn.Parameter(
            sincos_2d_pos_embed(predictor_dim, self.grid).unsqueeze(0), requires_grad=False
        )
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)  # type: ignore[arg-type]
            for _ in range(depth)
        )
        self.predictor_norm = norm_layer(predictor_dim)
        self.predictor_proj = nn.Linear(predictor_dim, embed_dim)
        nn.init.trunc_normal_(self.mask_token, std=init_std)
        self.apply(partial(_init_trunc_normal, std=init_std))

    def _positions(self, index: Tensor) -> Tensor:
        """(R, ..., K) unit indices -> (R, ..., K, predictor_dim) position embeddings."""
        return self.predictor_pos_embed[0][index]

    def forward(self, features: Encoding, mask: MaskSet) -> Tensor:
        if not isinstance(mask, MaskSet) or mask.targets is None:
            raise TypeError("IJEPAPredictor needs a MaskSet with target blocks: use masking=multiblock")
        if tuple(features.grid) != self.grid:
            raise ValueError(
                f"IJEPAPredictor was built for a {self.grid} patch grid but got {tuple(features.grid)}: "
                "model.decoder.img_size must equal the training crop (data.img_size)"
            )
        if mask.mask.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError("I-JEPA target blocks are patch indices: masking.unit_size must equal the patch size")
        context = features.tokens[:, features.num_prefix_tokens :]
        rows, num_context, _ = context.shape
        context_index = features.kept  # (R, K_c) ascending, as the encoder kept them
        x = self.predictor_embed(context) + self._positions(context_index)
        targets = mask.targets  # (R, T, K_t)
        num_targets, num_units = targets.shape[1:]
        queries = self.mask_token + self._positions(targets)  # (R, T, K_t, d)
        x = x.unsqueeze(1).expand(-1, num_targets, -1, -1)
        x = torch.cat([x, queries], dim=2).flatten(0, 1)  # (R·T, K_c + K_t, d)
        for block in self.predictor_blocks:
            x = block(x)
        x = self.predictor_proj(self.predictor_norm(x)[:, num_context:])
        return x.reshape(rows, num_targets, num_units, -1)
