"""ViT that encodes *every* patch, with a learnable mask token in place of the masked ones (SimMIM, MaskFeat).

SimMIM (Xie et al., arXiv 2111.09886, github.com/microsoft/SimMIM ``models/simmim.py``) and MaskFeat (Wei et al.,
arXiv 2112.09133, github.com/facebookresearch/SlowFast ``slowfast/models/masked.py``) replace the embedding of each
masked patch by one shared learnable vector *before* the position embedding, then run the full sequence (cls + all
patches) through the transformer. This is :class:`~mimlab.models.backbones.vit.MaskedViT` (same patch embedding,
position handling, blocks and final norm) with that one step swapped for MAE's dropping of masked tokens.

Mask convention: ``mask[n, l] = 1`` means unit ``l`` is masked; a coarser unit grid (SimMIM: 32-px units on 16-px
patches) is upsampled to the patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from mimlab.masking import MaskSet, as_mask_set, fill_masked, mask_to_token_grid
from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.vit import MaskedViT


class MaskTokenViT(MaskedViT):
    """:class:`MaskedViT` (all its arguments) plus ``mask_token`` (1, 1, D), truncated-normal(0.02) initialised.

    ``forward(x, mask)`` keeps every position: (N, C, H, W), (N, L_units) -> an ``Encoding`` of the final-normed cls and
    every patch (``Encoding.map``: (N, D, H/p, W/p)), masked patches having entered as the mask token. Without a mask
    the model is the plain ViT (``forward_tokens`` / ``forward_pooled`` as in :class:`MaskedViT`), e.g. for fine-tuning. The
    backbone contract is :class:`MaskedViT`'s (``mask_token`` gets the stem layer id, as in SimMIM's ``get_vit_layer``).
    A checkpoint of the plain encoder (fine-tuned, or not mask-token pre-trained) may lack ``mask_token``, which then
    keeps its init (``checkpoint_optional_keys``).
    """

    checkpoint_optional_keys = ("mask_token",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

    def _encode(self, x: Tensor, mask: Tensor | MaskSet | None, keep: Sequence[int]) -> Encoding:
        """(N, C, H, W), (N, L_units) -> the encoding of cls + every patch (N, 1+L, D), masked ones entered as the mask
        token; ``mask`` on the patch grid, ``hidden`` the outputs of blocks ``keep``."""
        tokens, grid = self._patch_tokens(x)
        token_mask = None
        if mask is not None:
            token_mask = mask_to_token_grid(as_mask_set(mask).mask.to(tokens.device), grid)
            tokens = fill_masked(tokens, token_mask, self.mask_token)
        tokens = self._add_pos_embed(tokens, grid)
        out, hidden = self._run_blocks(self._prepend_cls(tokens), self._attn_bias(tokens), keep)
        return Encoding(out, token_mask, grid, num_prefix_tokens=self.num_prefix_tokens, hidden=hidden)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Backbone contract: one map (N, D, H/p, W/p); with a mask, masked patches are encoded from the mask token."""
        return [self._encode(x, mask, ()).map]
