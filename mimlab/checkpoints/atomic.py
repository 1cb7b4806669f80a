"""Atomic checkpoint writes: a checkpoint is written to a temporary file in the same folder and renamed into place,
so a crash or a full disk never leaves a partial ``last.ckpt`` (the previous one stays intact)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mimlab.checkpoints.files import load_file, weights_only_form


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the path and what to do."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``<path>.tmp-XXXX`` then ``os.replace``s it onto ``path``, in weights-only form
    (:func:`~mimlab.checkpoints.files.weights_only_form`), and always loads weights-only, whatever ``weights_only``
    Lightning passes: resuming (``trainer.fit(ckpt_path=...)``) never runs code a checkpoint carries.
    """

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        if "://" in str(path):  # remote (fsspec) paths: Lightning's reader
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_file(path, map_location=map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        path, checkpoint = Path(path), weights_only_form(checkpoint)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        except OSError as err:
            raise CheckpointWriteError(
                err.errno,
                f"cannot write checkpoints to {path.parent}: {err.strerror}. "
                "Make the folder writable or choose another run folder (hydra.run.dir=...).",
            ) from err
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, RuntimeError) and "inline_container" not in str(err):
                raise  # not a write failure (torch.save reports a short write, e.g. a full disk, from inline_container)
            code = err.errno if isinstance(err, OSError) else errno.ENOSPC
            reason = err.strerror if isinstance(err, OSError) else "a short write: the disk or a quota is full"
            free = shutil.disk_usage(path.parent).free / 2**20
            hint = "Free disk space" if code == errno.ENOSPC else "Check the folder"
            raise CheckpointWriteError(
                code,
                f"writing checkpoint {path} failed ({reason}; {free:.0f} MiB free there); "
                f"the previous checkpoint at that path, if any, is intact. {hint} and resume "
                "from it.",
            ) from err
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
