"""Pixel targets for MAE / FCMAE / iTPN-pixel: patchified images, optionally normalised per patch (norm-pix)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mimlab.models.parts import Parts
from mimlab.models.patchify import patchify, unpatchify
from mimlab.targets.base import Target


class NormPixTarget(Target):
    """Target (N, L, p*p*C) = patchify(images, p), normalised per patch when ``norm_pix``.

    norm-pix (MAE ``--norm_pix_loss``): ``(t - mean) / sqrt(var + 1e-6)`` over the p*p*C values of each patch,
    with torch's default **unbiased** variance. The mask is not needed (the loss selects masked patches).
    """

    def __init__(self, patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.eps = eps

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> NormPixTarget:
        """Patches of the mask unit (``patch_size = masking.unit_size``)."""
        return cls(patch_size=parts.unit_size, **settings)

    def _stats(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        return patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        patches = patchify(images.float(), self.patch_size)
        if not self.norm_pix:
            return patches
        mean, var = self._stats(patches)
        return (patches - mean) / (var + self.eps) ** 0.5

    pixel_view = True

    @torch.no_grad()
    def to_image(self, pred: Tensor, images: Tensor) -> Tensor:
        """Map predictions (N, L, p*p*C) back to image space (N, C, H, W) using the statistics of ``images``'s patches."""
        pred = pred.float()
        if self.norm_pix:
            mean, var = self._stats(patchify(images.float(), self.patch_size))
            pred = pred * (var + self.eps) ** 0.5 + mean
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return unpatchify(pred, self.patch_size, grid, channels=images.shape[1])
