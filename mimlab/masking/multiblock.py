"""I-JEPA multi-block masking (Assran et al. 2023, arXiv 2301.08243; facebookresearch/ijepa ``src/masks/multiblock.py``).

Per batch, one target-block size and one context-block size are drawn; per image, ``num_targets`` target blocks and
one context block are placed at random, and (unless ``allow_overlap``) the target blocks are cut out of the context.

* **Block size** (once per batch): one uniform ``u``; scale ``s = lo + u·(hi − lo)``, aspect ``a`` from the same ``u``
  (as the official code does), ``area = int(L·s)``, ``h = round(sqrt(area·a))``, ``w = round(sqrt(area / a))``, each
  capped at grid side − 1. Targets: scale 0.15–0.2, aspect 0.75–1.5; context: scale 0.85–1.0, aspect 1.
* **Placement**: ``top ∈ [0, gh − h)``, ``left ∈ [0, gw − w)`` (the official upper bounds, so a block never touches the
  last row or column). The context block keeps only units outside every target block; a placement leaving
  ``≤ min_keep`` units is redrawn, and after every 20 failures one more target block stops constraining it.
* **Static shapes**: every image keeps the first (lowest-index) ``K_c`` context units, ``K_c`` = the smallest context
  count in the batch, as the official collator truncates.

Output: :class:`~mimlab.masking.mask_set.MaskSet` with ``mask`` (N, L), 1 = outside the context (removed from the
encoder input), and ``targets`` (N, num_targets, K_t) unit indices of the target blocks, each ascending.
Randomness comes from the given ``torch.Generator`` only (sizes first, then positions image by image). With one
generator per image (training), the batch's block sizes come from the first image's generator and each image's
placements from its own. The block sizes and the truncation are per (per-device) batch, as in the official collator,
so unlike per-image maskers the masks of an image depend on the batch it is in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mimlab.masking.base import MaskGenerator
from mimlab.masking.mask_set import MaskSet
from mimlab.masking.utils import check_range


class MultiBlockMasking(MaskGenerator):
    """Args (official ``mask`` config names in brackets): num_targets [num_pred_masks] 4, target_scale
    [pred_mask_scale] (0.15, 0.2), target_aspect [aspect_ratio] (0.75, 1.5), context_scale [enc_mask_scale]
    (0.85, 1.0), min_keep 10, allow_overlap False, unit_size [patch_size], max_tries (redraws before a constraint is
    dropped, 20)."""

    per_image = False  # block sizes and the context truncation are per batch (see module docstring)

    def __init__(
        self,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        min_keep: int = 10,
        allow_overlap: bool = False,
        unit_size: int = 16,
        max_tries: int = 20,
    ) -> None:
        if num_targets < 1:
            raise ValueError(f"masking.num_targets must be >= 1, got {num_targets}")
        for key, value, least in (("min_keep", min_keep, 0), ("unit_size", unit_size, 1), ("max_tries", max_tries, 1)):
            if value < least:
                raise ValueError(f"masking.{key} must be >= {least}, got {value}")
        self.num_targets = int(num_targets)
        self.target_scale = check_range("target_scale", target_scale, 0.0, 1.0)  # fractions of the grid
        self.target_aspect = check_range("target_aspect", target_aspect, 0.0)  # height / width
        self.context_scale = check_range("context_scale", context_scale, 0.0, 1.0)
        self.min_keep, self.allow_overlap = int(min_keep), bool(allow_overlap)
        self.unit_size, self.max_tries = int(unit_size), int(max_tries)

    def block_size(
        self, grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float], g: torch.Generator | None
    ) -> tuple[int, int]:
        """(h, w) of a block: one uniform draw sets both scale and aspect."""
        u = torch.rand(1, generator=g).item()
        area = int(grid[0] * grid[1] * (scale[0] + u * (scale[1] - scale[0])))
        ratio = aspect[0] + u * (aspect[1] - aspect[0])
        h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        return min(h, grid[0] - 1), min(w, grid[1] - 1)

    def _check(self, size: tuple[int, int], key: str, grid: tuple[int, int]) -> None:
        if size[0] * size[1] <= self.min_keep:
            raise ValueError(
                f"masking: a {key} block is {size[0]}x{size[1]} units on the {grid[0]}x{grid[1]} grid, "
                f"not more than masking.min_keep={self.min_keep}, so no placement is valid; lower "
                f"masking.min_keep or raise masking.{key}_scale / the image size"
            )

    def place(
        self,
        grid: tuple[int, int],
        size: tuple[int, int],
        g: torch.Generator | None,
        avoid: list[list[int]] | None = None,
    ) -> list[int]:
        """Place one block; return its unit indices (ascending) outside the ``avoid`` blocks (lists of unit indices).
        Plain Python arithmetic: this runs for every image of every step."""
        (gh, gw), (h, w) = grid, size
        avoid = avoid or []
        tries, budget = 0, self.max_tries
        while True:
            top = int(torch.randint(0, gh - h, (1,), generator=g))
            left = int(torch.randint(0, gw - w, (1,), generator=g))
            taken = set().union(*avoid[: max(len(avoid) - tries, 0)])
            indices = [
                i for r in range(top, top + h) for i in range(r * gw + left, r * gw + left + w) if i not in taken
            ]
            if len(indices) > self.min_keep:
                return indices
            budget -= 1
            if budget == 0:
                tries, budget = tries + 1, self.max_tries

    def __call__(  # type: ignore[override]
        self, batch_size: int, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> MaskSet:
        """``batch_size`` images' masks, everything drawn from one generator (the official collator's order)."""
        return self.batch(grid, [generator] * batch_size)

    def draw(self, grid: tuple[int, int], generator: torch.Generator) -> MaskSet:
        return self.batch(grid, [generator])

    def batch(self, grid: tuple[int, int], generators: Sequence[torch.Generator | None]) -> MaskSet:
        """Block sizes from ``generators[0]``, image ``n``'s placements from ``generators[n]``; visible = the batch's
        smallest context (the official truncation)."""
        per_image, batch_size = list(generators), len(generators)
        target_size = self.block_size(grid, self.target_scale, self.target_aspect, per_image[0])
        context_size = self.block_size(grid, self.context_scale, (1.0, 1.0), per_image[0])
        self._check(target_size, "target", grid)
        self._check(context_size, "context", grid)
        targets, contexts = [], []
        for g in per_image:
            blocks = [self.place(grid, target_size, g) for _ in range(self.num_targets)]
            contexts.append(self.place(grid, context_size, g, None if self.allow_overlap else blocks))
            targets.append(blocks)
        keep_t = min(len(t) for per_image in targets for t in per_image)
        keep_c = min(len(c) for c in contexts)
        mask = torch.ones(batch_size, grid[0] * grid[1])
        rows = torch.arange(batch_size).repeat_interleave(keep_c)
        mask[rows, torch.tensor([i for c in contexts for i in c[:keep_c]])] = 0.0
        target_index = torch.tensor([[t[:keep_t] for t in per_image] for per_image in targets])
        return MaskSet(mask, clones=1, targets=target_index, visible=keep_c)

    def __repr__(self) -> str:
        return (
            f"MultiBlockMasking(num_targets={self.num_targets}, target_scale={self.target_scale}, "
            f"target_aspect={self.target_aspect}, context_scale={self.context_scale}, min_keep={self.min_keep}, "
            f"allow_overlap={self.allow_overlap}, unit_size={self.unit_size})"
        )
