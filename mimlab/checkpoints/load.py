"""The one checkpoint loader: backbone (and neck) weights for every task, from mimlab checkpoints and official files.

Layouts, recognised from the keys (each converter lives beside this module):

* **mimlab** Lightning ``.ckpt``: ``state_dict`` with ``backbone.*`` and ``neck.*`` (decoder, target, head ignored);
* **official iTPN / HiViT** (PatchMerges inside the flat ``blocks`` list): :mod:`mimlab.checkpoints.itpn` splits it into
  the backbone and the pre-trained pyramid (the neck);
* **official ConvNeXt V2**, dense (``downsample_layers.*``), sparse FCMAE / MinkowskiEngine (``encoder.*``, ``.kernel``)
  or timm (``stem.*``): :mod:`mimlab.checkpoints.convnextv2` (FCMAE decoder dropped);
* **official MAE** (``{'model': ...}``, encoder at the top level): decoder keys and ``mask_token`` dropped.

A file may wrap the weights under ``state_dict`` / ``model`` / ``module`` / ``model_ema`` and prefix them ``module.``.
Classifier heads of official fine-tuned files (``head.*``, ``fc_norm.*``) that the backbone does not have are left out
and reported. Position embeddings are resampled to the backbone's grid (logged). A backbone may declare
``checkpoint_optional_keys`` (may be absent, e.g. ViTDet's rel-pos tables) and ``checkpoint_unused_keys`` (dropped).
Every mismatch is reported at once (missing, unexpected, shape-mismatched keys, with the file name), and a checkpoint of
another backbone family is named as such.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from mimlab.checkpoints.files import load_file

log = logging.getLogger(__name__)

MAE_NON_ENCODER = ("mask_token", "decoder_*")
OFFICIAL_HEADS = ("head.*", "fc_norm.*")
_UNWRAP = ("state_dict", "model", "module", "model_ema")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model; the message lists them."""


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


def read_state_dict(source: str | Path | Mapping) -> dict[str, Tensor]:
    """A path or a loaded checkpoint -> flat state dict (unwrapped, ``module.`` prefix removed)."""
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    for key in _UNWRAP:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    return {k.removeprefix("module."): v for k, v in obj.items()}


def pretrained_parts(source: str | Path | Mapping, prefix: str = "") -> tuple[dict[str, dict[str, Tensor]], str]:
    """``({"backbone": {...}, "neck": {...}}, layout)`` in mimlab parameter names; ``prefix`` selects a sub-model of a
    mimlab checkpoint (``"ema.module."`` for the fine-tuning EMA weights)."""
    state = read_state_dict(source)
    if any(k.startswith(prefix + "backbone.") for k in state):
        parts = {
            part: {k[len(prefix + part) + 1 :]: v for k, v in state.items() if k.startswith(f"{prefix}{part}.")}
            for part in ("backbone", "neck")
        }
        return parts, "mimlab"
    if any(re.match(r"(encoder\.)?blocks\.\d+\.reduction\.weight$", k) for k in state):
        from mimlab.checkpoints.itpn import convert_official_itpn

        split = convert_official_itpn(state)
        return {"backbone": split["backbone"], "neck": split["neck"]}, "official iTPN"
    if any(re.match(r"(encoder\.)?(downsample_layers|stem)\.", k) for k in state):
        from mimlab.checkpoints.convnextv2 import convert_convnextv2_state_dict

        return {"backbone": convert_convnextv2_state_dict(state)[0], "neck": {}}, "official ConvNeXt V2"
    encoder = {k: v for k, v in state.items() if not any(fnmatch.fnmatch(k, p) for p in MAE_NON_ENCODER)}
    return {"backbone": encoder, "neck": {}}, "official MAE"


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(key, p) for p in patterns)


def _adapt(key: str, value: Tensor, target: Tensor) -> Tensor:
    """Shape fixes that keep the meaning: GRN (1,1,1,C) <-> (C,), and pos-embed grid resampling (square grids, with or
    without a cls row: ViT ``pos_embed``, HiViT ``absolute_pos_embed``), logged."""
    if value.numel() == target.numel() and ("grn" in key or key.endswith(("gamma", "beta"))):
        return value.reshape(target.shape)
    if key.endswith("pos_embed") and value.dim() == 3 and target.dim() == 3 and value.shape[-1] == target.shape[-1]:
        from timm.layers import resample_abs_pos_embed

        prefix = 1 if (value.shape[1] ** 0.5) % 1 else 0
        side_old = int(round((value.shape[1] - prefix) ** 0.5))
        side_new = int(round((target.shape[1] - prefix) ** 0.5))
        if side_new * side_new + prefix == target.shape[1] and side_old * side_old + prefix == value.shape[1]:
            log.info(
                "%s: resampled from the checkpoint's %dx%d grid to the model's %dx%d grid (bicubic)",
                key,
                side_old,
                side_old,
                side_new,
                side_new,
            )
            return resample_abs_pos_embed(value, [side_new, side_new], [side_old, side_old], num_prefix_tokens=prefix)
    return value


def _family_mismatch(module: nn.Module, source: str, trained_target: str | None, state: dict, own: dict) -> str | None:
    """A one-line diagnosis when the checkpoint holds another backbone family than ``module``: a mimlab checkpoint names
    its backbone class (``model.backbone._target_``), which ``module`` must be or subclass (ViTDet loads a MaskedViT
    checkpoint); any file sharing no parameter name with the model."""
    name = type(module).__name__
    if trained_target:
        module_name, _, cls_name = trained_target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError, ValueError):
            cls = None
        if cls is not None and not isinstance(module, cls):
            return (
                f"checkpoint {source} was pre-trained with a {cls_name} backbone (model.backbone._target_="
                f"{trained_target}) but this run builds {name}: pick the model/backbone config of the checkpoint's "
                f"family (the one it was pre-trained with), or pass a {name} checkpoint."
            )
    if state and not set(state) & set(own):
        return (
            f"checkpoint {source} has no parameter of {name} (checkpoint keys like {sorted(state)[:3]}, model keys "
            f"like {sorted(own)[:3]}): it holds another backbone family; pick the model/backbone config it was "
            "trained with."
        )
    return None


def fit_state(
    module: nn.Module,
    state: dict[str, Tensor],
    source: str,
    layout: str,
    allow_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
    trained_target: str | None = None,
) -> dict[str, list[str]]:
    """Load ``state`` into ``module`` or raise :class:`CheckpointMismatchError` listing every problem (nothing loaded).

    ``allow_missing``: fnmatch patterns of module keys the checkpoint may lack (they keep their initialisation);
    ``ignore_unexpected``: patterns of checkpoint keys to drop; ``trained_target``: the class a mimlab checkpoint was
    trained with (names a family mismatch). Returns ``{"missing": [...], "ignored": [...]}``.
    """
    own = module.state_dict()
    drop = list(ignore_unexpected) + (list(OFFICIAL_HEADS) if layout != "mimlab" else [])
    ignored = sorted(k for k in state if k not in own and _matches(k, drop))
    state = {
        k: (_adapt(k, v, own[k]) if k in own and v.shape != own[k].shape else v)
        for k, v in state.items()
        if k not in ignored
    }
    missing = sorted(set(own) - set(state))
    bad_missing = [k for k in missing if not _matches(k, allow_missing)]
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(state) & set(own))
        if state[k].shape != own[k].shape
    ]
    if bad_missing or unexpected or mismatched:
        family = _family_mismatch(module, source, trained_target, state, own)
        if family:
            raise CheckpointMismatchError(family)
        lines = [f"checkpoint {source} ({layout} layout) does not fit {type(module).__name__}:"]
        for title, items in (
            ("shape mismatches", mismatched),
            ("missing in checkpoint", bad_missing),
            ("unexpected in checkpoint", unexpected),
        ):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                )
        lines.append(
            "  Check that model/backbone (and model/neck) match the checkpoint (size, patch, img_size), or list "
            "fine-tuning-only keys in task.allow_missing / checkpoint-only keys in task.ignore_unexpected."
        )
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(state, strict=False)
    if missing:
        log.info(
            "%s: %d %s keys kept their initialisation: %s",
            source,
            len(missing),
            type(module).__name__,
            ", ".join(missing[:10]),
        )
    if ignored:
        log.info("%s: %d checkpoint keys left out: %s", source, len(ignored), ", ".join(ignored[:10]))
    return {"missing": missing, "ignored": ignored}


def load_pretrained(
    source: str | Path | Mapping,
    backbone: nn.Module,
    neck: nn.Module | None = None,
    allow_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
) -> dict[str, dict]:
    """Fill ``backbone`` (and ``neck``, strictly) from a checkpoint of any supported layout; every task uses this.

    ``allow_missing`` / ``ignore_unexpected`` apply to the backbone (see :func:`fit_state`), together with the
    backbone's own ``checkpoint_optional_keys`` / ``checkpoint_unused_keys``. Returns the per-part reports
    ``{"backbone": {...}, "neck": {...}}`` and raises :class:`CheckpointMismatchError` on any mismatch.
    """
    name = str(source) if isinstance(source, (str, Path)) else "<state dict>"
    checkpoint = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    parts, layout = pretrained_parts(checkpoint)
    if not parts["backbone"]:
        raise CheckpointMismatchError(
            f"no backbone weights in {name} (looked for mimlab 'backbone.*' keys and the "
            "official MAE / ConvNeXt V2 / iTPN layouts); is this the right checkpoint?"
        )
    config = (checkpoint.get("mimlab") or {}).get("config") if isinstance(checkpoint, Mapping) else None
    trained_target = (((config or {}).get("model") or {}).get("backbone") or {}).get("_target_")
    allow_missing = (*allow_missing, *getattr(backbone, "checkpoint_optional_keys", ()))
    ignore_unexpected = (*ignore_unexpected, *getattr(backbone, "checkpoint_unused_keys", ()))
    report = {
        "backbone": fit_state(
            backbone, parts["backbone"], name, layout, allow_missing, ignore_unexpected, trained_target
        )
    }
    if neck is not None:
        if not parts["neck"]:
            raise CheckpointMismatchError(
                f"{name} ({layout} layout) has no neck weights to load into "
                f"{type(neck).__name__}; set task.load_neck=false"
            )
        report["neck"] = fit_state(neck, parts["neck"], name, layout)
    return report
