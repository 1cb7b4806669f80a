"""What the student must predict: pixels, HOG features, frozen teachers, EMA teachers."""

from mimlab.targets.base import Target
from mimlab.targets.hog import HOGTarget
from mimlab.targets.pixels import NormPixTarget

__all__ = ["HOGTarget", "NormPixTarget", "Target"]
