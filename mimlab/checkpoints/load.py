"""The one checkpoint loader: backbone (and neck) weights for every task, from mimlab checkpoints and official files.

Layouts, recognised from the keys (each converter lives beside this module):

* **mimlab** Lightning ``.ckpt``: ``state_dict`` with ``backbone.*`` and ``neck.*`` (decoder, target, head ignored);
* **official iTPN / HiViT** (PatchMerges inside the flat ``blocks`` list): :mod:`mimlab.checkpoints.itpn` splits it into
  the backbone and the pre-trained pyramid (the neck);
* **official ConvNeXt V2**, dense (``downsample_layers.*``), sparse FCMAE / MinkowskiEngine (``encoder.*``, ``.kernel``)
  or timm (``stem.*``): :mod:`mimlab.checkpoints.convnextv2` (FCMAE decoder dropped);
* **official SimMIM** ViT (BEiT layout) and Swin: :mod:`mimlab.checkpoints.simmim`;
* **official MaskFeat** (SlowFast ViT, ``model_state``): :mod:`mimlab.checkpoints.maskfeat`;
* **official data2vec 2.0** (fairseq, ``modality_encoders.IMAGE.*`` + ``blocks.*``):
  :mod:`mimlab.checkpoints.data2vec2`;
* **official I-JEPA** (``encoder`` / ``predictor`` / ``target_encoder`` side by side): :mod:`mimlab.checkpoints.ijepa`;
* **official MAE** (``{'model': ...}``, encoder at the top level): decoder keys and ``mask_token`` dropped.

A file may wrap the weights under ``state_dict`` / ``model`` / ``module`` / ``model_ema`` / ``model_state`` and prefix
them ``module.`` (:func:`mimlab.checkpoints.files.read_state_dict`, the one reader of every loader, teachers included). A file that holds several models (I-JEPA, data2vec 2.0's EMA teacher) gives its default one; a
``::name`` suffix on the path picks another (:mod:`mimlab.checkpoints.layout`). The layout, the sub-model and what was
left out (decoders, predictors, rebuilt buffers) are logged. Classifier heads of official fine-tuned files (``head.*``,
``fc_norm.*``) and the mask token of a mask-token encoder, when the backbone has none, are left out and reported.
Position embeddings are resampled to the backbone's grid (logged). A backbone may declare
``checkpoint_optional_keys`` (may be absent, e.g. ViTDet's rel-pos tables) and ``checkpoint_unused_keys`` (dropped).
Every mismatch is reported at once (missing, unexpected, shape-mismatched keys, with the file name), and a checkpoint of
another backbone family is named as such.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import Tensor, nn

from mimlab.checkpoints import data2vec2, ijepa, maskfeat, simmim
from mimlab.checkpoints.convnextv2 import convert_convnextv2_state_dict
from mimlab.checkpoints.files import read_checkpoint, read_state_dict
from mimlab.checkpoints.itpn import convert_official_itpn
from mimlab.checkpoints.layout import CheckpointMismatchError, Converted, Layout
from mimlab.models.backbones.contract import check_backbone

__all__ = ["CheckpointMismatchError", "fit_state", "load_pretrained", "pretrained_parts"]

log = logging.getLogger(__name__)

MAE_NON_ENCODER = ("mask_token", "decoder_*")
OFFICIAL_EXTRAS = ("head.*", "fc_norm.*", "mask_token")  # left out of official files when the backbone has none
OFFICIAL_LAYOUTS: tuple[Layout, ...] = (ijepa.LAYOUT, data2vec2.LAYOUT, simmim.VIT, simmim.SWIN, maskfeat.LAYOUT)
SUBMODEL_SEPARATOR = "::"


def split_submodel(path: str | Path) -> tuple[str | Path, str | None]:
    """``"file.pth::encoder"`` -> ``("file.pth", "encoder")``; a path without the suffix -> ``(path, None)``."""
    if SUBMODEL_SEPARATOR in str(path):
        file, _, submodel = str(path).rpartition(SUBMODEL_SEPARATOR)
        return file, submodel
    return path, None


def pretrained_parts(
    source: str | Path | Mapping, prefix: str = "", submodel: str | None = None, name: str | None = None
) -> tuple[dict[str, dict[str, Tensor]], str]:
    """``({"backbone": {...}, "neck": {...}}, layout)`` in mimlab parameter names; ``prefix`` selects a sub-model of a
    mimlab checkpoint (``"ema.module."`` for the fine-tuning EMA weights), ``submodel`` one of an official file that
    holds several (the layout's default when None; ``layout`` then names it). The encoder of a mimlab pre-training
    checkpoint is the module it names as ``evaluated_encoder`` (the student ``backbone``, or I-JEPA's target encoder
    ``target.teacher``). Logs the layout, the sub-model taken and what was left out, under ``name`` (default: the
    path)."""
    name = name or (str(source) if isinstance(source, (str, Path)) else "<state dict>")
    if isinstance(source, (str, Path)):
        file, suffix = split_submodel(source)
        checkpoint: Mapping = read_checkpoint(file)
        submodel = submodel or suffix
    else:
        checkpoint = source
    state = read_state_dict(checkpoint)
    neck: dict[str, Tensor] = {}
    if any(k.startswith(prefix + "backbone.") for k in state):
        _check_submodel(name, "mimlab", (), submodel)
        encoder = checkpoint.get("evaluated_encoder", "backbone") if isinstance(checkpoint, Mapping) else "backbone"
        if encoder != "backbone":
            log.info("%s: taking the encoder from %s.* (the weights the method evaluates)", name, encoder)
        modules = {"backbone": encoder, "neck": "neck"}
        parts = {
            part: {k[len(prefix + module) + 1 :]: v for k, v in state.items() if k.startswith(f"{prefix}{module}.")}
            for part, module in modules.items()
        }
        log.info("%s: mimlab layout%s", name, f" ({prefix}*)" if prefix else "")
        return parts, "mimlab"
    layout = next((lo for lo in OFFICIAL_LAYOUTS if lo.matches(checkpoint if lo.raw else state)), None)
    submodels = layout.submodels if layout is not None else ()
    if layout is not None:
        label = layout.name
        _check_submodel(name, label, submodels, submodel)  # before converting: the converter gets a name it has
        converted = layout.convert(checkpoint if layout.raw else state, submodel)
    elif any(re.match(r"(encoder\.)?blocks\.\d+\.reduction\.weight$", k) for k in state):
        split = convert_official_itpn(state)
        label, neck = "official iTPN", split["neck"]
        converted = Converted(split["backbone"], [*split["decoder"], *split["unused"]])
    elif any(re.match(r"(encoder\.)?(downsample_layers|stem)\.", k) for k in state):
        label = "official ConvNeXt V2"
        converted = Converted(*convert_convnextv2_state_dict(state))
    else:
        label = "official MAE"
        converted = Converted(
            {k: v for k, v in state.items() if not _matches(k, MAE_NON_ENCODER)},
            [k for k in state if _matches(k, MAE_NON_ENCODER)],
        )
    if layout is None:
        _check_submodel(name, label, (), submodel)
    chosen = (submodel or submodels[0]) if submodels else None
    taken = f", sub-model {chosen}" + (" (the default)" if submodel is None else "") if chosen else ""
    left = f"; left out: {_summary(converted.left_out)}" if converted.left_out else ""
    log.info("%s: %s layout%s%s", name, label, taken, left)
    for note in converted.notes:
        log.info("%s: %s", name, note)
    return {"backbone": converted.backbone, "neck": neck}, f"{label}, {chosen}" if chosen else label


def _check_submodel(name: str, layout: str, submodels: tuple[str, ...], submodel: str | None) -> None:
    """Refuse a ``::submodel`` that ``layout`` does not have, naming the ones it has."""
    if submodel is None or submodel in submodels:
        return
    if not submodels:
        raise CheckpointMismatchError(
            f"{name} ({layout} layout) holds one model, so it has no sub-model '{submodel}': drop "
            f"'{SUBMODEL_SEPARATOR}{submodel}' (sub-models exist in I-JEPA and data2vec 2.0 files)"
        )
    raise CheckpointMismatchError(
        f"{name} ({layout} layout) has no sub-model '{submodel}': ask for one of "
        f"{', '.join(SUBMODEL_SEPARATOR + s for s in submodels)} (default {submodels[0]}), or drop the suffix"
    )


def _summary(keys: Iterable[str]) -> str:
    """``decoder.0.weight, decoder.0.bias, _ema`` -> ``decoder.* (2), _ema``: numbers and weight/bias leaves folded."""
    counts: dict[str, int] = {}
    for key in keys:
        pattern = re.sub(r"\.(weight|bias)$", "", re.sub(r"(?<=\.)\d+(?=\.|$)", "*", key))
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(f"{p} ({n})" if n > 1 else p for p, n in counts.items())


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
    drop = list(ignore_unexpected) + (list(OFFICIAL_EXTRAS) if layout != "mimlab" else [])
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
    ``source`` may end in ``::<sub-model>`` (``target.pth.tar::encoder``) for a file that holds several models.

    ``allow_missing`` / ``ignore_unexpected`` apply to the backbone (see :func:`fit_state`), together with the
    backbone's own ``checkpoint_optional_keys`` / ``checkpoint_unused_keys``. Returns the per-part reports
    ``{"backbone": {...}, "neck": {...}}`` and raises :class:`CheckpointMismatchError` on any mismatch.
    """
    name, submodel, checkpoint = "<state dict>", None, source
    if isinstance(source, (str, Path)):
        name = str(source)
        file, submodel = split_submodel(source)
        checkpoint = read_checkpoint(file)
    parts, layout = pretrained_parts(checkpoint, submodel=submodel, name=name)
    if not parts["backbone"]:
        raise CheckpointMismatchError(
            f"no backbone weights in {name} (looked for mimlab 'backbone.*' keys and the official MAE, ConvNeXt V2, "
            "iTPN, SimMIM, MaskFeat, data2vec 2.0 and I-JEPA layouts, docs/checkpoints.md); is this the right "
            "checkpoint?"
        )
    config = (checkpoint.get("mimlab") or {}).get("config") if isinstance(checkpoint, Mapping) else None
    trained_target = (((config or {}).get("model") or {}).get("backbone") or {}).get("_target_")
    declared = check_backbone(backbone)
    allow_missing = (*allow_missing, *declared.checkpoint_optional_keys)
    ignore_unexpected = (*ignore_unexpected, *declared.checkpoint_unused_keys)
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
