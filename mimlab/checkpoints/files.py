"""Reading checkpoint files: every ``torch.load`` of a user-given path goes through :func:`load_file`, so a truncated,
corrupt or foreign file is reported by name instead of with torch's internal message
("mmap can only be used with files saved with ...", "PytorchStreamReader failed reading zip archive", ...)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save's pre-1.6 format: a pickle (protocol 2) of torch's magic number


class CheckpointReadError(RuntimeError):
    """A checkpoint file cannot be read; the message names it and says what it looks like."""


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _describe(path: Path) -> str:
    size = path.stat().st_size
    return "an empty file" if size == 0 else f"{size} bytes, starting with {_head(path)!r}"


def load_file(path: str | Path, map_location: Any = "cpu", weights_only: bool = False, mmap: bool = False) -> Any:
    """``torch.load(path)`` for a file saved by ``torch.save`` (zip or legacy format); ``mmap`` applies to zip files.

    Raises ``FileNotFoundError`` for a missing path and :class:`CheckpointReadError` naming the file when it is not a
    readable checkpoint. Errors that are about the content, not the file (``weights_only`` refusing a pickled class,
    a TorchScript archive) are left as torch raises them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and _head(path, 4) != _LEGACY_MAGIC:
        raise CheckpointReadError(
            f"{path} is not a PyTorch checkpoint ({_describe(path)}): it is truncated (an interrupted copy or "
            "download), corrupt, or another kind of file. Use an intact checkpoint, e.g. <run>/checkpoints/last.ckpt."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise
        raise CheckpointReadError(f"{path} cannot be read as a PyTorch checkpoint ({err}); it is corrupt.") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        if "TorchScript" in str(err) or "jit" in str(err).lower():
            raise
        raise CheckpointReadError(
            f"{path} cannot be read as a PyTorch checkpoint ({err}); it is truncated or "
            "corrupt. Use an intact checkpoint, e.g. <run>/checkpoints/last.ckpt."
        ) from err
