"""Base class for pre-training targets: ``forward(images, mask)`` returns what the decoder must predict."""

from __future__ import annotations

from torch import nn


class Target(nn.Module):
    """A target generator. Stateful targets (EMA teachers) override :meth:`update`, which the pre-training
    module calls after every optimiser step with the student backbone and the training progress in [0, 1].

    ``evaluated_encoder`` names the module of the pre-training module that holds the encoder the method evaluates and
    transfers: the student ``"backbone"``, or ``"target.teacher"`` where the method takes its EMA teacher (I-JEPA's
    target encoder). Checkpoints record it, and every loader of pre-trained weights reads that encoder.
    """

    evaluated_encoder: str = "backbone"

    def update(self, student: nn.Module, progress: float) -> None:
        """Follow the student after an optimiser step (no-op for stateless targets)."""
