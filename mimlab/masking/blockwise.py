"""BEiT-style block-wise masking (BEiT ``MaskingGenerator``; iTPN-CLIP uses 75 of 196 units, blocks ≥ 16 units).

Mask convention: ``mask[n, l] = 1`` means unit ``l`` (row-major over the ``gh × gw`` grid) is masked, ``0`` visible.

Per sample, rectangles are added until ``num_masked`` units are covered: each attempt draws an area
``U(min_num_patches, remaining)`` and a log-uniform aspect ratio in ``[min_aspect, 1/min_aspect]``, and a rectangle is
accepted only if it adds between 1 and ``remaining`` new units (10 attempts per block, as in BEiT). BEiT stops early when
no block fits, leaving fewer masked units; **our choice**: the shortfall is topped up with uniformly random units so that
every row masks exactly ``num_masked`` units (static shapes, the mimlab mask contract). Randomness comes from the
given ``torch.Generator`` only, so masks are reproducible.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mimlab.masking.base import MaskGenerator


class BlockMasking(MaskGenerator):
    """Args: ``num_masked`` units per image (75 at 14×14) or ``ratio`` (fraction of units, used when num_masked is
    None), ``unit_size`` in pixels, ``min_num_patches`` (16), ``max_num_patches`` (None = no limit beyond the
    remaining count), ``min_aspect`` (0.3; max is its inverse unless ``max_aspect`` is given)."""

    def __init__(
        self,
        unit_size: int = 16,
        num_masked: int | None = 75,
        ratio: float | None = None,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        if num_masked is None and ratio is None:
            raise ValueError("masking: set num_masked (units per image) or ratio for BlockMasking")
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise ValueError(
                f"masking.ratio must be in (0, 1) (0 masks nothing: the masked-unit loss is 0), got {ratio}"
            )
        self.unit_size = int(unit_size)
        self.num_masked, self.ratio = num_masked, ratio
        self.min_num_patches, self.max_num_patches = min_num_patches, max_num_patches
        if min_aspect <= 0:
            raise ValueError(f"masking.min_aspect must be > 0 (a block's height / width), got {min_aspect}")
        max_aspect = max_aspect or 1.0 / min_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"masking.max_aspect must be >= masking.min_aspect={min_aspect}, got {max_aspect}")
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts

    def count(self, num_units: int) -> int:
        n = self.num_masked if self.num_masked is not None else int(round(num_units * self.ratio))  # type: ignore[operator]
        if not 0 < n < num_units:
            raise ValueError(
                f"masking masks {n} of {num_units} mask unit(s) of {self.unit_size} px; it must mask at "
                f"least one and keep one visible (masking.num_masked / masking.ratio, data.img_size)"
            )
        return n

    def visible(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1] - self.count(grid[0] * grid[1])

    def _uniform(self, lo: float, hi: float, g: torch.Generator | None) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    def _randint(self, lo: int, hi: int, g: torch.Generator | None) -> int:  # inclusive bounds
        return int(torch.randint(lo, hi + 1, (), generator=g).item())

    def _add_block(self, m: Tensor, remaining: int, g: torch.Generator | None) -> int:
        gh, gw = m.shape
        for _ in range(self.max_attempts):
            area = self._uniform(self.min_num_patches, remaining, g)
            aspect = math.exp(self._uniform(*self.log_aspect, g))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < gw and h < gh:
                top, left = self._randint(0, gh - h, g), self._randint(0, gw - w, g)
                new = h * w - int(m[top : top + h, left : left + w].sum().item())
                if 0 < new <= remaining:
                    m[top : top + h, left : left + w] = 1
                    return new
        return 0

    def sample_one(self, grid: tuple[int, int], num: int, g: torch.Generator | None) -> Tensor:
        """One (gh, gw) mask with exactly ``num`` ones."""
        m = torch.zeros(grid)
        count = 0
        while count < num:
            remaining = num - count
            if self.max_num_patches is not None:
                remaining = min(remaining, self.max_num_patches)
            delta = self._add_block(m, remaining, g)
            if delta == 0:
                break
            count += delta
        if count < num:  # top up (our choice, see module docstring)
            free = (m.flatten() == 0).nonzero().squeeze(1)
            pick = free[torch.randperm(free.numel(), generator=g)[: num - count]]
            m.view(-1)[pick] = 1
        return m

    def __call__(
        self,
        batch_size: int,
        grid: tuple[int, int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Return a float mask (N, gh*gw), 1 = masked, every row with exactly ``count(L)`` masked units."""
        num = self.count(grid[0] * grid[1])
        mask = torch.stack([self.sample_one(grid, num, generator).flatten() for _ in range(batch_size)])
        return mask.to(device) if device is not None else mask

    def __repr__(self) -> str:
        return f"BlockMasking(unit_size={self.unit_size}, num_masked={self.num_masked}, ratio={self.ratio})"
