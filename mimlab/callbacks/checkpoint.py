"""The run's checkpoint callback: the best checkpoint per validation, ``last.ckpt`` every N steps and at the end."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``every_n_train_steps`` meaning "refresh ``last.ckpt`` every N steps".

    In ``ModelCheckpoint`` that argument replaces the per-validation schedule, and a step save waits for the monitored
    metric (``val/loss``), which does not exist before the first validation: with 12 steps per epoch and N = 5 it
    wrote nothing in epoch 0 and nothing after step 20 of 24. Here the two schedules are separate:

    * the best checkpoint (``monitor``, ``save_top_k``) is judged at every validation, as without N;
    * ``last.ckpt`` is written at every N-th optimiser step whatever the metrics, at every best-checkpoint save, and
      at the end of training, so it always holds the run's final state.

    All other arguments are ``ModelCheckpoint``'s.
    """

    def __init__(self, *args: Any, every_n_train_steps: int | None = None, **kwargs: Any) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(
                f"callbacks.checkpoint.every_n_train_steps must be >= 0 or null, got {every_n_train_steps}"
            )
        super().__init__(*args, **kwargs)
        self.last_every_n_train_steps = every_n_train_steps or 0
        self._last_written_at: int | None = None

    def _refresh_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (public API only: ``format_checkpoint_name`` + ``trainer.save_checkpoint``, through
        the run's atomic checkpoint IO); the best-checkpoint decision of this step is left to validation."""
        if not self.save_last or self._last_written_at == trainer.global_step:
            return
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit":  # type: ignore[attr-defined]
            return
        metrics = {
            **trainer.callback_metrics,
            "epoch": torch.tensor(trainer.current_epoch),
            "step": torch.tensor(trainer.global_step),
        }
        path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(path, self.save_weights_only)
        self.last_model_path = path
        self._last_written_at = trainer.global_step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # any save at this step (ModelCheckpoint's own saves always include last.ckpt) makes a refresh redundant; and
        # a last.ckpt rewritten in on_train_end after the epoch-end one resumed as a finished run (test_pretrain_e2e)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        self._last_written_at = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)
