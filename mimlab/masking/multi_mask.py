"""Multi-mask (data2vec 2.0, Baevski et al. 2022, arXiv 2212.07525; fairseq ``examples/data2vec``, ``clone_batch``).

Each image gets ``clones`` independently drawn masks from ``base``. The encoder, decoder and loss then run on
``N·clones`` rows while an EMA teacher encodes each image once, amortising the teacher over the clones.
Output: :class:`~mimlab.masking.mask_set.MaskSet` with ``mask`` (N·clones, L), 1 = masked; rows ``n·clones … n·clones +
clones − 1`` belong to image ``n``. With one generator, ``base`` is called once for all ``N·clones`` rows, as fairseq
computes the masks of the cloned batch in one call; with one generator per image (training), image ``n``'s clones are
drawn from ``generator[n]``, so an image gets the same masks whatever batch or process it lands in.
"""

from __future__ import annotations

from typing import Any

import torch

from mimlab.masking.mask_set import MaskSet


class MultiMask:
    """Args: ``base`` (any mask generator returning (rows, L)), ``clones`` (M; data2vec 2.0 ViT-B: 16)."""

    takes_sample_generators = True  # MaskedPretraining hands over the per-image generators (see module docstring)

    def __init__(self, base: Any, clones: int) -> None:
        if clones < 1:
            raise ValueError(f"masking.clones must be >= 1, got {clones}")
        self.base = base
        self.clones = int(clones)
        self.unit_size = base.unit_size

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self.base.grid(image_size)

    def __call__(
        self, batch_size: int, grid: tuple[int, int], generator: torch.Generator | list[torch.Generator] | None = None
    ) -> MaskSet:
        if isinstance(generator, list):
            mask = torch.cat([self.base(self.clones, grid, generator=g) for g in generator])
        else:
            mask = self.base(batch_size * self.clones, grid, generator=generator)
        return MaskSet(mask, clones=self.clones)

    def __repr__(self) -> str:
        return f"MultiMask({self.base!r}, clones={self.clones})"
