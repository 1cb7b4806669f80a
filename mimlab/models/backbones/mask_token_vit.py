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

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from mimlab.masking import MaskSet, as_mask_set, fill_masked, mask_to_token_grid
from mimlab.models.backbones.vit import MaskedViT


class MaskTokenViT(MaskedViT):
    """:class:`MaskedViT` (all its arguments) plus ``mask_token`` (1, 1, D), truncated-normal(0.02) initialised.

    ``forward(x, mask)`` is the *dense* encoder kind: (N, C, H, W), (N, L_units) -> (N, D, H/p, W/p), the final-normed
    encoding of every patch (cls dropped), masked patches having entered as the mask token. Without a mask the model is
    the plain ViT (``forward_tokens`` / ``forward_features`` as in :class:`MaskedViT`), e.g. for fine-tuning. The
    backbone contract is :class:`MaskedViT`'s (``mask_token`` gets the stem layer id, as in SimMIM's ``get_vit_layer``).
    A checkpoint of the plain encoder (fine-tuned, or not mask-token pre-trained) may lack ``mask_token``, which then
    keeps its init (``checkpoint_optional_keys``).
    """

    checkpoint_optional_keys = ("mask_token",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """(N, C, H, W), (N, L_units) -> (N, 1+L, D) final-normed cls + every patch, masked ones as the mask token."""
        tokens, grid = self._patch_tokens(x)
        tokens = fill_masked(tokens, mask_to_token_grid(mask, grid), self.mask_token)
        tokens = self._add_pos_embed(tokens, grid)
        out, _ = self._run_blocks(self._prepend_cls(tokens), self._attn_bias(tokens))
        return out

    def forward(self, x: Tensor, mask: Tensor | MaskSet | None = None) -> Tensor:  # type: ignore[override]
        """(N, C, H, W), (N, L_units) 1 = masked (or its ``MaskSet``) -> (N, D, H/p, W/p) map of every patch."""
        mask = as_mask_set(mask).mask if mask is not None else None
        if mask is None:
            return super().forward_features(x)[-1]
        out = self.encode(x, mask)[:, 1:]
        n, _, d = out.shape
        return out.transpose(1, 2).reshape(n, d, x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Backbone contract: one map (N, D, H/p, W/p); with a mask, masked patches are encoded from the mask token."""
        return [self.forward(x, mask)]
