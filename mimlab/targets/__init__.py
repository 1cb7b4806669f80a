"""What the student must predict: pixels, frozen teachers, EMA teachers."""
from mimlab.targets.base import Target
from mimlab.targets.pixels import NormPixTarget

__all__ = ["NormPixTarget", "Target"]
