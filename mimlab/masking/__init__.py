"""Mask generators and helpers. Convention everywhere: ``mask = 1`` means masked/removed, ``0`` visible."""
from mimlab.masking.random import RandomMasking
from mimlab.masking.utils import fill_masked, keep_indices, mask_to_token_grid, num_visible, upsample_mask

__all__ = ["RandomMasking", "fill_masked", "keep_indices", "mask_to_token_grid", "num_visible", "upsample_mask"]
