"""Masks drawn in the DataLoader workers and delivered with the batch (pre-training).

The pre-training task hands its mask generator to the DataModule (:meth:`ResumableDataModule.deliver_masks`). Every
sample then carries a mask seed (:class:`~mimlab.data.resumable.SeededDataset`: from (seed, epoch, index) in training,
from (seed, index) in validation, so every validation sees the same masks) and
:class:`MaskingCollate` draws the batch's masks from them in the worker, appending a
:class:`~mimlab.masking.MaskSet` (stating its visible count) to the batch: ``(images, labels, masks)``.

So the masks overlap the training step instead of running inside it, a resumed run draws the masks of the
uninterrupted one, and an image's masks do not depend on the batch size, the worker count or the number of processes
(validation included, so ``val/loss`` of a checkpoint is the same at any batch size and process count). The one
exception is a generator with ``per_image = False`` (I-JEPA's multi-block masking draws its block sizes per batch and
truncates the context to the batch's smallest, as the official collator does): its masks depend on the batch it is in.
Mask convention: 1 = masked, 0 visible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import default_collate

from mimlab.masking.base import MaskGenerator


class MaskingCollate:
    """``collate_fn`` for samples ``(*fields, mask_seed)``: ``inner`` (default: torch's ``default_collate``) stacks the
    fields, then the batch's masks are drawn with one generator per sample and appended: ``[*fields, MaskSet]``.

    ``image_size``: (H, W) the model sees; None reads it from the collated images (N, C, H, W) (a loader that hands
    over encoded bytes states it)."""

    def __init__(
        self, masking: MaskGenerator, inner: Callable | None = None, image_size: tuple[int, int] | None = None
    ) -> None:
        self.masking, self.inner, self.image_size = masking, inner or default_collate, image_size

    def __call__(self, samples: list[tuple[Any, ...]]) -> list[Any]:
        seeds = [sample[-1] for sample in samples]
        batch = self.inner([sample[:-1] for sample in samples])
        size = self.image_size or tuple(batch[0].shape[-2:])
        return [*batch, self.masking.from_seeds(size, seeds)]
