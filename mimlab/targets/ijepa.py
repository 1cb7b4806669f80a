"""I-JEPA targets (Assran et al. 2023, arXiv 2301.08243; facebookresearch/ijepa ``src/train.py`` ``forward_target``).

The EMA target encoder encodes the **full** image; its output (after the final norm) is layer-normalised over channels
(no affine) and the tokens of each target block are gathered.
``forward(images (N, C, H, W), mask) -> (N, T, K_t, D)`` for a :class:`~mimlab.masking.MaskSet` with ``targets``
(N, T, K_t); without target blocks (a plain mask) every token is returned, (N·M, L, D). Mask convention: 1 = masked.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimlab.masking import MaskSet, as_mask_set, repeat_clones
from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.parts import Parts
from mimlab.targets.ema_teacher import EMATeacher, LinearMomentum


class IJEPATarget(EMATeacher):
    """Args: teacher (a ``MaskedViT`` built like the context encoder, no cls token), momentum (schedule; default
    the official linear 0.996 → 1.0 over training)."""

    evaluated_encoder = "target.teacher"  # the target encoder: what the paper evaluates (official linear probes)

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> EMATeacher:
        """A copy of the ViT context encoder as the target encoder (its targets are a ViT's patch tokens)."""
        parts.require("backbone", MaskedViT, "IJEPATarget")
        return super().attach(parts, **settings)

    def __init__(self, teacher: nn.Module, momentum: LinearMomentum | None = None) -> None:
        super().__init__(teacher, momentum or LinearMomentum(0.996, 1.0))

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor | MaskSet | None = None) -> Tensor:
        h = self.teacher.forward_tokens(images)[:, self.teacher.num_prefix_tokens :]  # type: ignore[operator]
        h = F.layer_norm(h.float(), h.shape[-1:])
        if mask is None:
            return h
        masks = as_mask_set(mask)
        h = repeat_clones(h, masks.clones)
        if masks.targets is None:
            return h
        rows, (num_targets, num_units) = h.shape[0], masks.targets.shape[1:]
        index = masks.targets.reshape(rows, -1, 1).expand(-1, -1, h.shape[-1])
        return torch.gather(h, 1, index).reshape(rows, num_targets, num_units, -1)
