"""Refuse to resume a checkpoint under a different model definition (unless the user says so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mimlab.checkpoints.files import load_file
from mimlab.utils.refusal import Refusal

# config sections that define the trained function; changing them under a resumed run is almost always a mistake
MODEL_SECTIONS = ("model", "target", "masking", "loss")  # `task` only interpolates these


class ConfigMismatchError(Refusal, ValueError):
    """The resumed checkpoint was trained with a different model config; the message lists the keys."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: dict, current: dict, sections: tuple[str, ...] = MODEL_SECTIONS) -> list[str]:
    """Human-readable ``key: saved -> current`` lines for every differing leaf under ``sections``."""
    old = _flatten({k: saved.get(k) for k in sections})
    new = _flatten({k: current.get(k) for k in sections})
    return [
        f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def check_resume_config(ckpt_path: str | Path, current: dict, allow_change: bool = False) -> list[str]:
    """Compare the config stored in ``ckpt_path`` with ``current``; raise unless identical or ``allow_change``."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(
            f"ckpt_path={path} does not exist; point it at a checkpoint (e.g. <run>/checkpoints/last.ckpt)"
        )
    ckpt = load_file(path, mmap=True)
    saved = (ckpt.get("mimlab") or {}).get("config")
    if saved is None:
        return []
    diffs = config_differences(saved, current)
    if diffs and not allow_change:
        raise ConfigMismatchError(
            f"{path} was trained with a different model config:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the original settings, or pass allow_config_change=true if the change is intended."
        )
    return diffs
