"""The run's progress bar: Lightning's ``RichProgressBar`` with its metrics read once per logging step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.trainer.states import RunningStage


class ProgressBar(RichProgressBar):
    """``RichProgressBar`` reads every progress-bar value with ``.item()`` after every batch (a device sync per step
    on a GPU, and the reduction of the logged values on any device); here, in training, the values shown are re-read
    every ``metrics_every_n_steps`` optimiser steps (null: the trainer's ``log_every_n_steps``) and in between the
    last ones are shown. The bar itself still advances every batch; validation and the other stages are unchanged."""

    def __init__(self, metrics_every_n_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_every_n_steps = metrics_every_n_steps
        self.metrics: dict[str, Any] | None = None
        self.metrics_step = -1

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if trainer.state.stage != RunningStage.TRAINING:
            return super().get_metrics(trainer, pl_module)
        every = max(self.metrics_every_n_steps or trainer.log_every_n_steps or 1, 1)  # type: ignore[attr-defined]
        step = trainer.global_step
        if self.metrics is None or step // every != self.metrics_step // every or trainer.should_stop:
            self.metrics, self.metrics_step = super().get_metrics(trainer, pl_module), step
        return self.metrics
