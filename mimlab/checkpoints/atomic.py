"""Atomic checkpoint writes: a checkpoint is written to a temporary file in the same folder and renamed into place,
so a crash or a full disk never leaves a partial ``last.ckpt`` (the previous one stays intact)."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the path and what to do."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``<path>.tmp-XXXX`` then ``os.replace``s it onto ``path``.

    Loading defaults to ``weights_only=False`` because mimlab checkpoints carry RNG states (numpy arrays) and the
    resolved config; only resume from checkpoints you trust.
    """

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=bool(weights_only))

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        except OSError as err:
            raise CheckpointWriteError(err.errno, f"cannot write checkpoints to {path.parent}: {err.strerror}. "
                                       "Make the folder writable or choose another run folder (hydra.run.dir=...).") from err
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            Path(tmp).unlink(missing_ok=True)
            hint = "Free disk space" if err.errno == errno.ENOSPC else "Check the folder"
            raise CheckpointWriteError(err.errno, f"writing checkpoint {path} failed ({err.strerror}); the previous "
                                       f"checkpoint at that path, if any, is intact. {hint} and resume from it.") from err
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
