"""data2vec 2.0 contextualized targets (Baevski et al. 2022, arXiv 2212.07525; fairseq ``examples/data2vec/models/
data2vec2.py`` ``make_targets``, image config ``instance_norm_target_layer`` + ``layer_norm_targets``).

The EMA teacher encodes the **full, unmasked** image once; the outputs of the feed-forward sub-layer (before its
residual) of the top ``top_k`` blocks are each instance-normalised (per channel over the patch tokens, eps 1e-5, no
affine), averaged, and layer-normalised over channels (no affine). Prefix (cls) tokens are dropped first.
The per-image target is then repeated for the mask's ``clones`` (multi-mask: one teacher pass serves all M masked
versions). ``forward(images (N, C, H, W), mask) -> (N·M, L, D)``; mask convention 1 = masked (not used otherwise).
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


def average_top_k(layers: list[Tensor], instance_norm: bool = True, layer_norm: bool = True) -> Tensor:
    """data2vec target from K per-block outputs (N, L, D): instance-norm each over L, mean over K, layer-norm over D."""
    if instance_norm:
        layers = [F.instance_norm(t.float().transpose(1, 2)).transpose(1, 2) for t in layers]
    y = torch.stack([t.float() for t in layers]).mean(0)
    return F.layer_norm(y, y.shape[-1:]) if layer_norm else y


class Data2VecTarget(EMATeacher):
    """Args: teacher (a ``MaskedViT`` built like the student, e.g. ``post_norm=true``), momentum (schedule; default
    the ViT-B recipe's linear 0.9998 → 0.99999 over 26.65 % of training), top_k (10 for ViT-B), instance_norm,
    layer_norm (both on in the image recipes)."""

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> EMATeacher:
        """A copy of the ViT student as the teacher (its targets are a ViT's FFN outputs)."""
        parts.require("backbone", MaskedViT, "Data2VecTarget")
        return super().attach(parts, **settings)

    def __init__(
        self,
        teacher: nn.Module,
        momentum: LinearMomentum | None = None,
        top_k: int = 10,
        instance_norm: bool = True,
        layer_norm: bool = True,
    ) -> None:
        super().__init__(teacher, momentum or LinearMomentum(0.9998, 0.99999, 100_000 / 375_300))
        depth = len(teacher.blocks)  # type: ignore[arg-type]
        if not 1 <= top_k <= depth:
            raise ValueError(f"target.top_k={top_k} must be in [1, {depth}] (the teacher's depth)")
        self.top_k, self.instance_norm, self.layer_norm = top_k, instance_norm, layer_norm

    def _ffn_outputs(self, images: Tensor) -> list[Tensor]:
        """Run the teacher on the full image; return the FFN outputs (N, L, D) of its top ``top_k`` blocks."""
        return self.teacher.forward_ffn_outputs(images, self.top_k)  # type: ignore[operator]

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor | MaskSet | None = None) -> Tensor:
        y = average_top_k(self._ffn_outputs(images), self.instance_norm, self.layer_norm)
        return repeat_clones(y, 1 if mask is None else as_mask_set(mask).clones)
