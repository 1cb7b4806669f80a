"""The mask-generator interface every masking strategy implements.

Mask convention: ``mask[r, l] = 1`` means unit ``l`` (row-major over the ``gh × gw`` grid of ``unit_size``-pixel
units) is removed from / hidden in the encoder input, ``0`` visible.

A generator draws a **batch's masks from one** ``torch.Generator`` **per image** (:meth:`MaskGenerator.batch`): the
DataLoader workers call it with generators seeded by (seed, epoch, sample index), so the masks of an image do not
depend on the batch size, the worker count, the number of processes or a resume, and the training step receives them
with the batch. The result is a :class:`~mimlab.masking.mask_set.MaskSet` that states its visible count, so no
backbone counts it from the mask (a device read) and a compiled step has no data-dependent shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from mimlab.masking.mask_set import MaskSet

if TYPE_CHECKING:
    from mimlab.models.parts import Parts


class MaskGenerator:
    """Base of the mask generators. Subclasses set ``unit_size`` (pixels per unit) and implement ``__call__``
    (``batch_size`` rows from one generator, in the official code's draw order) and :meth:`visible`; a generator whose
    masks depend on the whole batch (I-JEPA's per-batch block sizes) sets ``per_image = False`` and overrides
    :meth:`batch`."""

    unit_size: int
    per_image: ClassVar[bool] = True  # an image's masks depend only on its own generator

    @classmethod
    def attach(cls, parts: Parts, unit_size: int | None = None, **settings: Any) -> MaskGenerator:
        """Build for the backbone (:mod:`mimlab.models.parts`): ``unit_size`` None = one unit per token of its final
        map (its last stride: the patch of a ViT, 16 px for HiViT, 32 px for ConvNeXt V2)."""
        return cls(unit_size=unit_size or parts.backbone.out_strides[-1], **settings)  # type: ignore[call-arg]

    def __call__(self, batch_size: int, grid: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(gh, gw) units of an ``image_size`` (H, W) image; a size that is not a multiple of the unit is an error."""
        h, w = image_size
        if h % self.unit_size or w % self.unit_size:
            raise ValueError(f"image size {h}x{w} is not divisible by masking.unit_size={self.unit_size}")
        return h // self.unit_size, w // self.unit_size

    def visible(self, grid: tuple[int, int]) -> int:
        """Visible units per mask row on ``grid`` (the same for every row: static shapes)."""
        raise NotImplementedError

    def draw(self, grid: tuple[int, int], generator: torch.Generator) -> MaskSet:
        """One image's masks (one row; a multi-mask generator returns its clones)."""
        return MaskSet(self(1, grid, generator), visible=self.visible(grid))

    def batch(self, grid: tuple[int, int], generators: Sequence[torch.Generator]) -> MaskSet:
        """The masks of a batch, image ``n`` drawn from ``generators[n]``."""
        return MaskSet.stack([self.draw(grid, g) for g in generators])

    def from_seeds(self, image_size: tuple[int, int], seeds: Sequence[int]) -> MaskSet:
        """The masks of a batch of ``image_size`` (H, W) images, image ``n`` drawn from a generator seeded ``seeds[n]``
        (what the loader workers and a step without delivered masks both do)."""
        return self.batch(self.grid(image_size), seeded_generators(seeds))


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
