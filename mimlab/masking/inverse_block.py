"""Inverse block masking (data2vec 2.0, Baevski et al. 2022; fairseq ``data_utils.compute_block_mask_2d`` with
``inverse_mask=True``): the *visible* units are a few square blocks, everything else is masked.

Mask convention: ``mask[n, l] = 1`` means unit ``l`` (row-major over the ``gh × gw`` grid) is masked, ``0`` visible.

With ``keep = 1 − ratio`` (ratio 0.8 in the ViT-B recipe), per image:

1. draw ``int(L · (keep + ratio_adjust) / block_size²)`` block centres uniformly (with replacement) over the ``L`` units;
2. mark a ``block_size × block_size`` square around each centre visible (offsets ``−block_size//2 …``, clamped to the grid);
3. top up or thin out uniformly at random (``multinomial`` without replacement) to exactly ``int(L · keep)`` visible;
4. invert: visible blocks -> 0, the rest -> 1.

At 224 px / 16 (L = 196), ratio 0.8, block 3, adjust 0.07: 5 centres, 39 visible, 157 masked. The random draws come
from the given ``torch.Generator`` in the official order (all centres of the batch, then per-row adjustment).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimlab.masking.base import MaskGenerator
from mimlab.masking.utils import check_visible


class InverseBlockMasking(MaskGenerator):
    """Args: ``ratio`` (fraction masked, 0.8), ``block_size`` (fairseq ``mask_length``, 3), ``ratio_adjust``
    (``mask_prob_adjust``, 0.07: extra centres to offset block overlap), ``unit_size`` (pixels per unit, = patch size)."""

    def __init__(
        self, ratio: float = 0.8, block_size: int = 3, ratio_adjust: float = 0.07, unit_size: int = 16
    ) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"masking.ratio must be in (0, 1), got {ratio}")
        if block_size < 2:
            raise ValueError(f"masking.block_size must be >= 2 (1 is random masking), got {block_size}")
        self.ratio, self.block_size, self.ratio_adjust = float(ratio), int(block_size), float(ratio_adjust)
        self.unit_size = int(unit_size)

    def num_visible(self, num_units: int) -> int:
        """``int(L · (1 − ratio))``; at least one unit must stay visible and one masked."""
        return check_visible(int(num_units * (1 - self.ratio)), num_units, self.unit_size, self.ratio)

    def visible(self, grid: tuple[int, int]) -> int:
        return self.num_visible(grid[0] * grid[1])

    def _blocks(self, batch_size: int, grid: tuple[int, int], g: torch.Generator | None) -> Tensor:
        """(N, L) with 1 on the union of the blocks around the drawn centres."""
        gh, gw = grid
        length = gh * gw
        num_centres = int(length * ((1 - self.ratio + self.ratio_adjust) / self.block_size**2))
        centres = torch.randint(0, length, (batch_size, num_centres), generator=g)
        offsets = torch.arange(self.block_size) - self.block_size // 2
        rows = (centres.div(gw, rounding_mode="floor")[..., None, None] + offsets[:, None]).clamp(0, gh - 1)
        cols = (centres.remainder(gw)[..., None, None] + offsets[None, :]).clamp(0, gw - 1)
        batch = torch.arange(batch_size)[:, None, None, None]
        blocks = torch.zeros(batch_size, gh, gw)
        blocks[batch, rows, cols] = 1.0
        return blocks.reshape(batch_size, length)

    def __call__(self, batch_size: int, grid: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
        """Return a float mask (N, gh*gw), 1 = masked, every row with exactly ``num_visible(L)`` zeros."""
        keep = self._blocks(batch_size, grid, generator)
        target = self.num_visible(keep.shape[1])
        for row, count in zip(keep, keep.sum(1).int().tolist()):
            if count > target:
                row[torch.multinomial(row, count - target, replacement=False, generator=generator)] = 0.0
            elif count < target:
                row[torch.multinomial(1 - row, target - count, replacement=False, generator=generator)] = 1.0
        return 1.0 - keep

    def __repr__(self) -> str:
        return (
            f"InverseBlockMasking(ratio={self.ratio}, block_size={self.block_size}, "
            f"ratio_adjust={self.ratio_adjust}, unit_size={self.unit_size})"
        )
