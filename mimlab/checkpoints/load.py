"""Load weights from a checkpoint into a module by key prefix, with errors that list what does not fit."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mimlab.checkpoints.files import load_file


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model; the message lists them."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a Lightning ``.ckpt`` (``state_dict``) or an official checkpoint (``model`` / ``state_dict`` / bare)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path (e.g. the `checkpoint=` override)")
    ckpt = load_file(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def load_pretrained(module: nn.Module, path: str | Path, prefix: str = "backbone.", strict: bool = True) -> list[str]:
    """Copy ``prefix``-keys of the checkpoint at ``path`` into ``module`` (prefix stripped).

    With ``strict`` every parameter of ``module`` must be found with the same shape; otherwise only shape mismatches
    are errors. Returns the module keys that were missing from the checkpoint.
    """
    state = {k[len(prefix):]: v for k, v in read_state_dict(path).items() if k.startswith(prefix)}
    if not state:
        raise CheckpointMismatchError(f"no keys starting with {prefix!r} in {path}; is this the right checkpoint?")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"checkpoint {path} (prefix {prefix!r}) does not fit {type(module).__name__}:"]
        for title, items in (("shape mismatches", mismatched), ("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        lines.append("  Check that the model config matches the one the checkpoint was trained with.")
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing
