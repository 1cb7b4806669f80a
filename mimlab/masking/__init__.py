"""Mask generators and helpers. Convention everywhere: ``mask = 1`` means masked/removed, ``0`` visible.

A generator returns a (N, L) tensor or, when a plain mask cannot say everything (several masks per image, target
sets that are not the complement of the visible units), a :class:`MaskSet`."""

from mimlab.masking.mask_set import MaskSet, as_mask_set, repeat_clones
from mimlab.masking.random import RandomMasking
from mimlab.masking.utils import fill_masked, keep_indices, mask_to_token_grid, num_visible, upsample_mask

__all__ = [
    "MaskSet",
    "RandomMasking",
    "as_mask_set",
    "fill_masked",
    "keep_indices",
    "mask_to_token_grid",
    "num_visible",
    "repeat_clones",
    "upsample_mask",
]
