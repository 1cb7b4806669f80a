"""Small batch helpers used from configs."""

from typing import Any


def batch_size(batch: Any) -> int:
    """Number of samples in an (images, labels) batch or a bare image tensor."""
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(images.shape[0])
