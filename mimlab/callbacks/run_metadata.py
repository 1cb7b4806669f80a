"""Stores the resolved config, code version and environment inside every checkpoint (``checkpoint["mimlab"]``)."""
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
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class RunMetadata(L.Callback):
    """Adds ``{"config", "code_version", "torch"}`` to each checkpoint so a checkpoint is self-describing."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.metadata = {"config": config, "code_version": code_version(), "torch": str(torch.__version__)}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["mimlab"] = self.metadata
