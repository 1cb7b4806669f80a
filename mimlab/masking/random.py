"""Random masking over a grid of mask units (MAE ``random_masking``; FCMAE ``gen_random_mask``).

Mask convention: ``mask[n, l] = 1`` means unit ``l`` is masked (removed), ``0`` means visible.
Every sample keeps exactly ``num_keep(L) = int(L * (1 - ratio))`` units, so shapes are static.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mimlab.masking.base import MaskGenerator
from mimlab.masking.mask_set import MaskSet
from mimlab.masking.utils import check_visible


class RandomMasking(MaskGenerator):
    """Uniformly random masking of ``ratio`` of the ``unit_size``-pixel units of an image.

    Args:
        ratio: fraction of units to mask, in (0, 1): 0 masks nothing, so a masked-unit loss is 0.
        unit_size: side of a mask unit in pixels (16 = one ViT-B/16 patch, 32 = FCMAE / Img2Vec).
    """

    def __init__(self, ratio: float, unit_size: int) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(
                f"masking.ratio must be in (0, 1) (0 masks nothing: the masked-unit loss is 0), got {ratio}"
            )
        if unit_size < 1:
            raise ValueError(f"masking.unit_size must be >= 1 pixel, got {unit_size}")
        self.ratio = float(ratio)
        self.unit_size = int(unit_size)

    def num_keep(self, num_units: int) -> int:
        """Visible units per sample, ``int(L * (1 - ratio))``; at least one unit must stay visible and one masked."""
        return check_visible(int(num_units * (1 - self.ratio)), num_units, self.unit_size, self.ratio)

    def visible(self, grid: tuple[int, int]) -> int:
        return self.num_keep(grid[0] * grid[1])

    def __call__(
        self,
        batch_size: int,
        grid: tuple[int, int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Return a float mask (N, gh*gw), 1 = masked; noise is drawn on the CPU from ``generator``."""
        mask = self._from_noise(torch.rand(batch_size, grid[0] * grid[1], generator=generator))
        return mask.to(device) if device is not None else mask

    def batch(self, grid: tuple[int, int], generators: Sequence[torch.Generator]) -> MaskSet:
        """Each image's noise from its own generator (as :meth:`draw` would), ranked in one vectorised pass."""
        noise = torch.stack([torch.rand(grid[0] * grid[1], generator=g) for g in generators])
        return MaskSet(self._from_noise(noise), visible=self.visible(grid))

    def _from_noise(self, noise: Tensor) -> Tensor:
        """(N, L) uniform noise -> (N, L) mask: the ``num_keep`` lowest-noise units of each row visible (MAE)."""
        batch_size, length = noise.shape
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(batch_size, length)
        mask[:, : self.num_keep(length)] = 0
        return torch.gather(mask, 1, ids_restore)

    def __repr__(self) -> str:
        return f"RandomMasking(ratio={self.ratio}, unit_size={self.unit_size})"
