"""``MaskSet``: a mask generator's output when a plain ``(N, L)`` mask is not enough.

Two methods need more than "which units does the encoder drop":

* **several masked versions of each image** (data2vec 2.0 "multi-mask"): ``clones = M`` rows per image, so the
  encoder, decoder, target and loss all work on ``N·M`` rows while the images (and an EMA teacher's pass) stay at
  ``N``. Rows ``n·M … n·M + M − 1`` belong to image ``n`` (``repeat_interleave`` order).
* **what to predict is not the complement of what the encoder sees** (I-JEPA): ``targets`` holds ``T`` sets of ``K``
  unit indices per row (the target blocks); ``mask`` marks everything outside the context block.

Mask convention as everywhere: ``mask[r, l] = 1`` means unit ``l`` is removed from the encoder input, ``0`` visible;
every row keeps the same number of visible units, ``visible`` when the generator stated it (then nothing counts it from
the mask: no device read). A plain tensor mask is a ``MaskSet`` with ``clones=1`` and no ``targets``
(:func:`as_mask_set`); :meth:`MaskSet.plain` gives such a set back as the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskSet:
    """mask: (N·M, L) float, 1 = removed from the encoder input.  clones: M masked versions per image.
    targets: optional (N·M, T, K) long unit indices to predict, T sets of K units each (row-major unit grid).
    visible: visible units per row, as the generator states it (None: count it from ``mask``)."""

    mask: Tensor
    clones: int = 1
    targets: Tensor | None = None
    visible: int | None = None

    def __post_init__(self) -> None:
        if self.clones < 1 or self.mask.shape[0] % self.clones:
            raise ValueError(f"MaskSet: {self.mask.shape[0]} mask rows are not a multiple of clones={self.clones}")
        if self.targets is not None and (self.targets.ndim != 3 or self.targets.shape[0] != self.mask.shape[0]):
            raise ValueError(
                f"MaskSet: targets must be (rows, T, K) with rows={self.mask.shape[0]}, got {tuple(self.targets.shape)}"
            )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskSet:
        """On ``device`` (Lightning moves a batch's ``MaskSet`` with this)."""
        targets = None if self.targets is None else self.targets.to(device, non_blocking=non_blocking)
        return MaskSet(self.mask.to(device, non_blocking=non_blocking), self.clones, targets, self.visible)

    def pin_memory(self) -> MaskSet:
        """In pinned host memory (the DataLoader's ``pin_memory=True`` calls this)."""
        targets = None if self.targets is None else self.targets.pin_memory()
        return MaskSet(self.mask.pin_memory(), self.clones, targets, self.visible)

    def plain(self) -> Tensor | MaskSet:
        """The (N, L) mask tensor when the set says nothing more (one clone, no targets), else the set itself: what
        decoders, targets and losses take."""
        return self.mask if self.clones == 1 and self.targets is None else self

    @staticmethod
    def stack(sets: list[MaskSet]) -> MaskSet:
        """The sets of several images as one (rows in order); they must agree on clones and visible count."""
        first = sets[0]
        odd = [i for i, s in enumerate(sets) if (s.clones, s.visible) != (first.clones, first.visible)]
        if odd:
            raise ValueError(
                f"MaskSet.stack: image {odd[0]} has clones={sets[odd[0]].clones}, visible={sets[odd[0]].visible}; "
                f"image 0 has clones={first.clones}, visible={first.visible} (a batch needs one shape)"
            )
        targets = None if first.targets is None else torch.cat([s.targets for s in sets])  # type: ignore[misc]
        return MaskSet(torch.cat([s.mask for s in sets]), first.clones, targets, first.visible)


def as_mask_set(mask: Tensor | MaskSet) -> MaskSet:
    """A plain (N, L) mask becomes ``MaskSet(mask)`` (one version per image, no separate targets)."""
    return mask if isinstance(mask, MaskSet) else MaskSet(mask)


def repeat_clones(x: Tensor, clones: int) -> Tensor:
    """(N, ...) per image -> (N·M, ...) per mask row: row ``n·M + m`` is image ``n`` (``repeat_interleave``)."""
    return x if clones == 1 else x.repeat_interleave(clones, dim=0)
