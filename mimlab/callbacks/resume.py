"""Callbacks that make a run resumable exactly and survive preemption."""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def collect_rng_states() -> dict[str, Any]:
    """The global torch, CUDA (one state per device, ``[]`` without CUDA), numpy and Python RNG states, under the keys
    Lightning's ``seed`` utilities use (``torch``, ``torch.cuda``, ``numpy``, ``python``), so older checkpoints load.
    numpy's 624 key words travel as an int64 tensor, so the checkpoint loads weights-only."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`collect_rng_states`'s dict (keys it lacks are left alone)."""
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda"):
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    if "numpy" in states:
        name, keys, pos, has_gauss, cached_gaussian = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))  # a checkpoint round trip may turn the tuple into a list


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
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (preemption) or Ctrl-C, stop after the current batch, write ``<dirpath>/last.ckpt`` and print how to
    resume (``ckpt_path=<dirpath>/last.ckpt``). SIGUSR1 under SLURM is handled by Lightning's SLURM auto-requeue.

    Lightning stops gracefully on SIGTERM only; a Ctrl-C (SIGINT) would interrupt the step wherever it is and save
    nothing. So during ``fit`` the first Ctrl-C is turned into the SIGTERM path (a second one aborts at once, without
    saving). The stop reaches the caller as Lightning's ``SIGTERMException`` (a ``SystemExit``) whose ``code`` is set
    to ``128 + signal number`` (143 for SIGTERM, 130 for Ctrl-C), as a shell reports a process ended by that signal.
    DataLoader workers ignore the Ctrl-C their process group receives (``mimlab.data.workers.init_worker``; a worker
    of another loader forked during ``fit`` inherits this handler, which does nothing outside the main process).
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.signal = signal.SIGTERM
        self._pid: int | None = None
        self._previous_sigint: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _on_ctrl_c(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process handles it
            return
        signal.signal(signal.SIGINT, self._previous_sigint)  # a second Ctrl-C aborts without saving
        self.signal = signal.SIGINT
        rank_zero_info(
            "Ctrl-C: stopping after the current batch to save a checkpoint (press Ctrl-C again to abort without saving)"
        )
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's graceful stop (all DDP ranks follow rank 0)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            exception.code = 128 + self.signal
            name = "Ctrl-C" if self.signal == signal.SIGINT else "SIGTERM"
            rank_zero_info(
                f"{name} received: saved {self.path} at step {trainer.global_step}; resume with ckpt_path={self.path}"
            )


class LogHistory(L.Callback):
    """Keeps the loggers' history in step with the checkpoints: every checkpoint flushes the loggers first (the rows
    of the steps it holds survive a crash), and when training starts, a logger with ``rewind(step)``
    (:class:`mimlab.loggers.HistoryCSVLogger`) is told the step it starts at. Lightning logs every row of a batch, and
    the epoch-end rows after the last batch, at that batch's index (= ``global_step`` before it), so the rows before
    the resumed ``global_step`` are exactly those the resumed run will not log again."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()

    def on_train_start(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:
            if callable(getattr(logger, "rewind", None)):
                logger.rewind(trainer.global_step)
