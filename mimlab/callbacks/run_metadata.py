"""Stores the resolved config, code version and environment inside every checkpoint (``checkpoint["mimlab"]``)
and hands the resolved config to every logger as its hyper-parameters (wandb run config, ``csv/hparams.yaml``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch


def code_version() -> str:
    """The git commit of the mimlab checkout (with ``-dirty`` if it has local changes), or 'unknown'."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class RunMetadata(L.Callback):
    """Adds ``{"config", "code_version", "torch", "data"}`` to each checkpoint so a checkpoint is self-describing
    (``data`` is the DataModule's ``fingerprint()`` when it has one)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.metadata = {"config": config, "code_version": code_version(), "torch": str(torch.__version__)}

    def on_fit_start(self, trainer, pl_module) -> None:
        params = {**self.metadata["config"], "code_version": self.metadata["code_version"]}  # type: ignore[dict-item]
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if "data" not in self.metadata:
            fingerprint = getattr(trainer.datamodule, "fingerprint", None)
            self.metadata["data"] = fingerprint() if callable(fingerprint) else None  # type: ignore[assignment]
        checkpoint["mimlab"] = self.metadata
