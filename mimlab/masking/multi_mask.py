"""Multi-mask (data2vec 2.0, Baevski et al. 2022, arXiv 2212.07525; fairseq ``examples/data2vec``, ``clone_batch``).

Each image gets ``clones`` independently drawn masks from ``base``. The encoder, decoder and loss then run on
``N·clones`` rows while an EMA teacher encodes each image once, amortising the teacher over the clones.
Output: :class:`~mimlab.masking.mask_set.MaskSet` with ``mask`` (N·clones, L), 1 = masked; rows ``n·clones … n·clones +
clones − 1`` belong to image ``n``. With one generator, ``base`` is called once for all ``N·clones`` rows, as fairseq
computes the masks of the cloned batch in one call; with one generator per image (:meth:`MultiMask.batch`, the loader
workers), image ``n``'s clones are drawn from its own, so an image gets the same masks whatever batch or process it
lands in.
"""

from __future__ import annotations

from typing import Any

import torch

from mimlab.masking.base import MaskGenerator
from mimlab.masking.mask_set import MaskSet
from mimlab.models.parts import Parts


class MultiMask(MaskGenerator):
    """Args: ``base`` (any mask generator returning (rows, L)), ``clones`` (M; data2vec 2.0 ViT-B: 16)."""

    @classmethod
    def attach(cls, parts: Parts, unit_size: int | None = None, **settings: Any) -> MaskGenerator:
        """The mask unit is the base generator's (``base``, built for the same parts by :func:`~mimlab.models.parts.build`)."""
        if unit_size is not None:
            raise ValueError("MultiMask draws with its base generator's unit: set masking.base.unit_size")
        return cls(**settings)

    def __init__(self, base: MaskGenerator, clones: int) -> None:
        if clones < 1:
            raise ValueError(f"masking.clones must be >= 1, got {clones}")
        self.base = base
        self.clones = int(clones)
        self.unit_size = base.unit_size

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self.base.grid(image_size)

    def visible(self, grid: tuple[int, int]) -> int:
        return self.base.visible(grid)

    def __call__(  # type: ignore[override]
        self, batch_size: int, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> MaskSet:
        """``batch_size · clones`` rows from one generator in one call (fairseq's order for the cloned batch)."""
        mask = self.base(batch_size * self.clones, grid, generator=generator)
        return MaskSet(mask, clones=self.clones, visible=self.visible(grid))

    def draw(self, grid: tuple[int, int], generator: torch.Generator) -> MaskSet:
        """One image's ``clones`` masks from its generator."""
        return MaskSet(
            self.base(self.clones, grid, generator=generator), clones=self.clones, visible=self.visible(grid)
        )

    def __repr__(self) -> str:
        return f"MultiMask({self.base!r}, clones={self.clones})"
