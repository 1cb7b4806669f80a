"""Base class for pre-training targets: ``forward(images, mask)`` returns what the decoder must predict."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Target(nn.Module):
    """A target generator. Stateful targets (EMA teachers) override :meth:`update`, which the pre-training
    module calls after every optimiser step with the student backbone and the training progress in [0, 1].

    ``evaluated_encoder`` names the module of the pre-training module that holds the encoder the method evaluates and
    transfers: the student ``"backbone"``, or ``"target.teacher"`` where the method takes its EMA teacher (I-JEPA's
    target encoder). Checkpoints record it, and every loader of pre-trained weights reads that encoder.

    What shared code may ask of every target (declared here, so no caller probes for attributes):

    * ``from_teacher``: the target is a network's features (a frozen or EMA teacher), which the teacher panel maps;
    * ``pixel_view``: :meth:`to_image` turns a prediction into pixels, which the reconstruction panel draws.
    """

    evaluated_encoder: str = "backbone"
    from_teacher: bool = False

    @property
    def pixel_view(self) -> bool:
        """Whether :meth:`to_image` gives a prediction in pixel space (pixel targets)."""
        return False

    def to_image(self, pred: Any, images: Tensor) -> Tensor:
        """A prediction as images (N, C, H, W) like ``images`` (only where :attr:`pixel_view`)."""
        raise TypeError(f"{type(self).__name__} predicts no pixels (pixel_view is False)")

    def update(self, student: nn.Module, progress: float) -> None:
        """Follow the student after an optimiser step (no-op for stateless targets)."""
