"""Base class for pre-training targets: ``forward(images, mask)`` returns what the decoder must predict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from mimlab.models.parts import Parts


class Target(nn.Module):
    """A target generator. Stateful targets (EMA teachers) override :meth:`update`, which the pre-training
    module calls after every optimiser step with the student backbone and the training progress in [0, 1].

    ``evaluated_encoder`` names the module of the pre-training module that holds the encoder the method evaluates and
    transfers: the student ``"backbone"``, or ``"target.teacher"`` where the method takes its EMA teacher (I-JEPA's
    target encoder). Checkpoints record it, and every loader of pre-trained weights reads that encoder.

    What shared code may ask of every target (declared here, so no caller probes for attributes):

    * ``from_teacher``: the target is a network's features (a frozen or EMA teacher), which the teacher panel maps;
    * ``pixel_view``: :meth:`to_image` turns a prediction into pixels, which the reconstruction panel draws;
    * ``dim``: the width of one target token where it is fixed (a decoder predicting it is built to that width,
      :class:`mimlab.models.parts.Parts`), else None.

    Configs build a target with :meth:`attach` (Hydra ``_partial_: true``; :mod:`mimlab.models.parts`).
    """

    evaluated_encoder: str = "backbone"
    from_teacher: bool = False
    dim: int | None = None

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> Target:
        """Build the target for ``parts`` (the backbone and mask generator it serves) from its own ``settings``;
        targets that need nothing from the other parts take the settings as they are."""
        return cls(**settings)

    @property
    def pixel_view(self) -> bool:
        """Whether :meth:`to_image` gives a prediction in pixel space (pixel targets)."""
        return False

    def to_image(self, pred: Any, images: Tensor) -> Tensor:
        """A prediction as images (N, C, H, W) like ``images`` (only where :attr:`pixel_view`)."""
        raise TypeError(f"{type(self).__name__} predicts no pixels (pixel_view is False)")

    def update(self, student: nn.Module, progress: float) -> None:
        """Follow the student after an optimiser step (no-op for stateless targets)."""
