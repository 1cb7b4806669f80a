"""Pre-training losses. Each returns a dict whose ``"loss"`` entry is optimised; the other entries are logged."""
from mimlab.losses.masked_mse import MaskedMSE

__all__ = ["MaskedMSE"]
