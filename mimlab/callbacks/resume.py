"""Callbacks that make a run resumable exactly and survive preemption."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class RNGState(L.Callback):
    """Saves the torch / CUDA / numpy / python RNG states in each checkpoint and restores them on resume
    (dropout, drop-path and data2vec 2.0's decoder noise then continue exactly; masks and augmentation are seeded per
    step/sample anyway).

    The states are put back at the start of the first training batch after loading, not at load time: between loading
    and that batch, Lightning and the callbacks still draw from the global RNG (each DataLoader iterator draws its base
    seed, the dashboard's FLOP count runs a training step), which an uninterrupted run did before the saved step."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = _collect_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (Lightning stops after the current batch) write ``<dirpath>/last.ckpt`` so the run can resume
    with ``ckpt_path=<dirpath>/last.ckpt``. SIGUSR1 under SLURM is handled by Lightning's SLURM auto-requeue."""

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            rank_zero_info(f"SIGTERM received: saved {self.path} at step {trainer.global_step}; "
                           f"resume with ckpt_path={self.path}")
