"""Callbacks that make a run resumable exactly and survive preemption."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def collect_rng_states() -> dict[str, Any]:
    """The global torch, CUDA (one state per device, ``[]`` without CUDA), numpy and Python RNG states, under the keys
    Lightning's ``seed`` utilities use (``torch``, ``torch.cuda``, ``numpy``, ``python``), so older checkpoints load."""
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate()}


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`collect_rng_states`'s dict (keys it lacks are left alone)."""
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda"):
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))  # a checkpoint round trip may turn the tuple into a list


class RNGState(L.Callback):
    """Saves the torch / CUDA / numpy / python RNG states in each checkpoint and restores them on resume
    (dropout and drop-path then continue exactly; masks and augmentation are seeded per step/sample anyway)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])


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
