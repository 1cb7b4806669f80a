"""Pre-training losses. Each returns a dict whose ``"loss"`` entry is optimised; the other entries are logged."""

from mimlab.losses.masked_l1 import MaskedL1
from mimlab.losses.masked_mse import MaskedMSE

__all__ = ["MaskedL1", "MaskedMSE"]
