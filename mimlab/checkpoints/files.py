"""Reading checkpoint files: every ``torch.load`` of a user-given path goes through :func:`load_file`, which loads
**weights-only** (tensors, numbers, strings and containers; never code), so a checkpoint cannot run what it carries.
A truncated, corrupt or foreign file is reported by name instead of with torch's internal message ("mmap can only be
used with files saved with ...", "PytorchStreamReader failed reading zip archive", ...), and a file that only a full
unpickle could read is refused with the one-liner that converts a file its owner trusts.

:func:`weights_only_form` is the other half: what mimlab writes (``AtomicCheckpointIO``) is put into that form first, so
every mimlab checkpoint loads weights-only.
"""

from __future__ import annotations

import argparse
import os
import pickle
import types
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from mimlab.utils.refusal import Refusal

_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save's pre-1.6 format: a pickle (protocol 2) of torch's magic number
_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)
_CODE = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType)


class CheckpointReadError(RuntimeError):
    """A checkpoint file cannot be read; the message names it and says what it looks like."""


class UnsafeCheckpointError(Refusal, CheckpointReadError):
    """A checkpoint needs a full unpickle (it may run code): refused; the message says how to convert a trusted one."""


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _describe(path: Path) -> str:
    size = path.stat().st_size
    return "an empty file" if size == 0 else f"{size} bytes, starting with {_head(path)!r}"


def check_checkpoint_path(path: Path) -> None:
    """``IsADirectoryError`` for a folder (suggesting its ``checkpoints/last.ckpt`` when there is one),
    ``FileNotFoundError`` for a missing path; nothing for a file."""
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        hint = (
            f"did you mean {last}?"
            if last.is_file()
            else "give the checkpoint file in it, e.g. <run>/checkpoints/last.ckpt."
        )
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a checkpoint file; {hint}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path")


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy-format file: torch's message below still names the first one
        names = []
    return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "") if names else "Python objects"


def conversion_hint(path: Path) -> str:
    """The one-liner that rewrites a trusted checkpoint in weights-only form (next to it, ``<stem>.weights_only<ext>``)."""
    out = path.with_name(f"{path.stem}.weights_only{path.suffix or '.pt'}")
    return (
        f'python -c "import torch; from mimlab.checkpoints.files import weights_only_form; '
        f"torch.save(weights_only_form(torch.load({str(path)!r}, weights_only=False)), {str(out)!r})\""
    )


def load_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False, safe_globals: list | None = None) -> Any:
    """Weights-only ``torch.load(path)`` of a file saved by ``torch.save`` (zip or legacy format); ``mmap`` applies to
    zip files, ``safe_globals`` allow-lists further classes (e.g. ``argparse.Namespace`` of official MAE files).

    Raises ``FileNotFoundError`` / ``IsADirectoryError`` for a missing path or a folder, :class:`UnsafeCheckpointError`
    for a file that needs a full unpickle, and :class:`CheckpointReadError` naming the file when it is not a readable
    checkpoint. A TorchScript archive is left to torch's error (``read_checkpoint`` reads it with ``torch.jit.load``).
    """
    path = Path(path)
    check_checkpoint_path(path)
    if not path.is_file():  # a FIFO or a device would block or stream forever
        raise CheckpointReadError(f"{path} is not a regular file; give a checkpoint file.")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and _head(path, 4) != _LEGACY_MAGIC:
        raise CheckpointReadError(
            f"{path} is not a PyTorch checkpoint ({_describe(path)}): it is truncated (an interrupted copy or "
            "download), corrupt, or another kind of file. Use an intact checkpoint, e.g. <run>/checkpoints/last.ckpt."
        )
    try:
        with torch.serialization.safe_globals(list(safe_globals or [])):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise UnsafeCheckpointError(
                f"{path} holds {_unsafe_globals(path)}: loading it needs a full unpickle, which runs whatever code "
                "the file carries, so mimlab loads checkpoints weights-only and refuses it. If you trust where the "
                f"file comes from, convert it once (tensors, numbers and containers kept):\n  {conversion_hint(path)}"
            ) from None
        raise CheckpointReadError(f"{path} cannot be read as a PyTorch checkpoint ({err}); it is corrupt.") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        if "TorchScript" in str(err) or "jit" in str(err).lower():
            raise
        raise CheckpointReadError(
            f"{path} cannot be read as a PyTorch checkpoint ({err}); it is truncated or "
            "corrupt. Use an intact checkpoint, e.g. <run>/checkpoints/last.ckpt."
        ) from err


def read_checkpoint(path: str | Path) -> dict:
    """Weights-only ``torch.load`` of a checkpoint file on the CPU (:func:`~mimlab.checkpoints.files.load_file`; MAE-style
    files also pickle an ``argparse.Namespace``, allow-listed); OpenAI CLIP ``.pt`` TorchScript archives are read with
    ``torch.jit.load``. A file that needs a full unpickle is refused (``UnsafeCheckpointError``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; check the path (mimlab never downloads weights: "
            "official files must be saved locally first)"
        )
    try:
        return load_file(path, safe_globals=[argparse.Namespace])
    except RuntimeError as err:  # TorchScript archive
        if "TorchScript" not in str(err) and "jit" not in str(err).lower():
            raise
        return torch.jit.load(str(path), map_location="cpu").state_dict()


# Keys under which files keep their weights, tried in this order and as deep as they nest: DINO / iBOT (``teacher``),
# Lightning (``state_dict``: every mimlab checkpoint), MAE / ConvNeXt V2 / iTPN / data2vec 2.0 (``model``,
# ``model_ema``), DDP dumps (``module``), MaskFeat / SlowFast (``model_state``).
WRAPPERS = ("teacher", "state_dict", "model", "module", "model_ema", "model_state")


def read_state_dict(source: str | Path | Mapping, prefixes: tuple[str, ...] = ("module.",)) -> dict[str, Tensor]:
    """A path or a loaded checkpoint -> its flat state dict: unwrapped through :data:`WRAPPERS` until a level holds
    tensors, with each of ``prefixes`` stripped from the keys wherever they lead (DDP's ``module.``; a teacher also
    strips DINO's ``backbone.``, ``torch.compile``'s ``_orig_mod.`` and ``encoder.``)."""
    obj: Any = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint holds a {type(obj).__name__}, expected a state dict")
    return {_strip(key, prefixes): value for key, value in obj.items()}


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    while (prefix := next((p for p in prefixes if key.startswith(p)), None)) is not None:
        key = key[len(prefix) :]
    return key


def weights_only_form(obj: Any, where: str = "checkpoint", _path: tuple[int, ...] = ()) -> Any:
    """``obj`` rebuilt from what a weights-only load accepts: tensors, numbers, strings, dtypes, dicts (``OrderedDict``
    kept), lists, tuples, sets. Converted: numpy arrays -> tensors, numpy scalars -> numbers, OmegaConf containers ->
    plain ones, paths -> strings, an ``nn.Module`` -> its ``state_dict()``, any other object -> the dict of its
    attributes. ``TypeError`` naming the entry (``checkpoint['a'][0]``) for anything else."""
    if type(obj) in _LEAVES or isinstance(obj, torch.Tensor):
        return obj
    if id(obj) in _path:
        raise TypeError(f"{where} refers back to itself; it cannot be stored weights-only")
    path = (*_path, id(obj))
    if isinstance(obj, (DictConfig, ListConfig)):
        return weights_only_form(OmegaConf.to_container(obj, resolve=True), where, path)
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where} is a numpy array of Python objects; it cannot be stored weights-only")
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, nn.Module):
        return weights_only_form(obj.state_dict(), where, path)
    if isinstance(obj, dict):
        items = [
            (weights_only_form(k, where, path), weights_only_form(v, f"{where}[{k!r}]", path)) for k, v in obj.items()
        ]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple, set)):
        values = [weights_only_form(v, f"{where}[{i}]", path) for i, v in enumerate(obj)]
        return set(values) if isinstance(obj, set) else (values if isinstance(obj, list) else tuple(values))
    if hasattr(obj, "__dict__") and not isinstance(obj, _CODE):
        return weights_only_form(dict(vars(obj)), where, path)
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which cannot be stored weights-only"
    )
