"""Import official ConvNeXt-V2 weights (FCMAE pre-trained, fine-tuned, sparse-encoder or timm layout)
into :class:`mimlab.models.backbones.convnextv2.MaskedConvNeXtV2`.

Accepted layouts (METHODS.md §3.6), detected per key:

* **official dense** (``convnextv2_*_fcmae.pt``, ``*_ema.pt``): ``downsample_layers.k.*``, ``stages.s.b.{dwconv,
  norm, pwconv1, grn.gamma, grn.beta, pwconv2}``, ``norm.*``/``head.*`` for fine-tuned models. GRN params are
  ``(1, 1, 1, C)``; they are reshaped to our ``(C,)``.
* **sparse FCMAE** (MinkowskiEngine model state): ``encoder.`` prefix, ``.kernel`` conv weights of shape
  ``(k², in, out)`` (depthwise ``(k², C)``), ``.ln.``/``.linear.`` wrappers, biases ``(1, C)``, GRN ``(1, C)``;
  converted the way ConvNeXt-V2 ``remap_checkpoint_keys`` does. FCMAE decoder keys (``proj``, ``mask_token``,
  ``decoder``, ``pred``) are dropped.
* **timm** (``convnextv2_*.fcmae*``): ``stem.*``, ``stages.s.downsample.*``, ``stages.s.blocks.b.{conv_dw, norm,
  mlp.fc1, mlp.grn.weight/bias, mlp.fc2}``, ``head.norm``/``head.fc`` (1x1-conv MLP weights of the small
  ``conv_mlp`` variants are flattened).

A checkpoint file may wrap the weights under ``'model'`` or ``'state_dict'``; a ``module.`` prefix is removed, and
from a mimlab pre-training checkpoint (Lightning ``state_dict`` with ``backbone.*`` keys) only the backbone is read.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from mimlab.checkpoints.files import load_file

__all__ = ["CheckpointMismatchError", "LoadReport", "convert_convnextv2_state_dict", "load_convnextv2_checkpoint"]

_DECODER_ROOTS = ("proj", "pred", "mask_token", "decoder")

_TIMM_RULES = [  # (pattern, replacement), applied in order
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.", r"stages.\1."),
    (r"\.conv_dw\.", ".dwconv."),
    (r"\.mlp\.fc1\.", ".pwconv1."),
    (r"\.mlp\.fc2\.", ".pwconv2."),
    (r"\.mlp\.grn\.weight$", ".grn.gamma"),
    (r"\.mlp\.grn\.bias$", ".grn.beta"),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]


class CheckpointMismatchError(RuntimeError):
    """The converted checkpoint does not fit the model; the message lists every offending key."""


@dataclass
class LoadReport:
    """What happened to each key: loaded into the model, dropped on purpose, or left at init."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)


def _unwrap(obj: Mapping) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in obj):  # a mimlab MaskedPretraining checkpoint: keep the encoder
        obj = {k.removeprefix("backbone."): v for k, v in obj.items() if k.startswith("backbone.")}
    return obj


def _sparse_kernel_to_weight(v: torch.Tensor) -> torch.Tensor:
    """Minkowski ``(k², in, out)`` -> ``(out, in, k, k)``; depthwise ``(k², C)`` -> ``(C, 1, k, k)``."""
    ks = math.isqrt(v.shape[0])
    if v.dim() == 3:
        return v.permute(2, 1, 0).reshape(v.shape[2], v.shape[1], ks, ks).transpose(3, 2).contiguous()
    return v.permute(1, 0).reshape(v.shape[1], 1, ks, ks).transpose(3, 2).contiguous()


def convert_convnextv2_state_dict(state_dict: Mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map any supported layout to mimlab names. Returns ``(converted, dropped_keys)``."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in _unwrap(state_dict).items():
        k = key.removeprefix("encoder.")
        if k.split(".")[0] in _DECODER_ROOTS:
            dropped.append(key)
            continue
        if k.endswith(".kernel"):  # sparse conv
            k, value = k[: -len(".kernel")] + ".weight", _sparse_kernel_to_weight(value)
        k = re.sub(r"\.(ln|linear)\.", ".", k)  # MinkowskiLayerNorm.ln / MinkowskiLinear.linear
        for pattern, repl in _TIMM_RULES:
            k = re.sub(pattern, repl, k)
        if k.endswith((".grn.gamma", ".grn.beta")) or (k.endswith(".bias") and value.dim() > 1):
            value = value.reshape(-1)
        if re.search(r"\.pwconv[12]\.weight$", k) and value.dim() == 4:  # timm conv_mlp: 1x1 conv
            value = value.flatten(1)
        out[k] = value
    return out, dropped


def load_convnextv2_checkpoint(
    model: nn.Module,
    checkpoint: str | Path | Mapping,
    *,
    allow_missing: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> LoadReport:
    """Load ``checkpoint`` (a path or a state dict in any supported layout) into ``model``.

    ``allow_missing``: key prefixes that may stay at init (e.g. ``("norm.", "head.")`` when fine-tuning from
    an FCMAE checkpoint, which has neither). ``ignore``: key prefixes of the checkpoint to drop (e.g. ``("head.",)``
    for a different class count). Raises :class:`CheckpointMismatchError` listing missing keys, unexpected keys and
    shape mismatches; nothing is loaded in that case.
    """
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "<state dict>"
    if isinstance(checkpoint, (str, Path)):
        checkpoint = load_file(checkpoint, weights_only=True)
    converted, dropped = convert_convnextv2_state_dict(checkpoint)
    ignore, allow_missing = tuple(ignore), tuple(allow_missing)
    for k in [k for k in converted if k.startswith(ignore)] if ignore else []:
        dropped.append(k)
        del converted[k]
    own = model.state_dict()
    report = LoadReport(dropped=dropped)
    report.unexpected = sorted(k for k in converted if k not in own)
    report.missing = sorted(k for k in own if k not in converted and not k.startswith(allow_missing))
    report.shape_mismatch = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in converted.items() if k in own and v.shape != own[k].shape)
    if report.missing or report.unexpected or report.shape_mismatch:
        lines = [f"ConvNeXt-V2 checkpoint {source} does not fit {type(model).__name__} "
                 f"(depths={getattr(model, 'depths', '?')}, dims={getattr(model, 'dims', '?')}):"]
        for title, keys in (("missing in checkpoint", report.missing), ("unexpected in checkpoint", report.unexpected),
                            ("shape mismatch", report.shape_mismatch)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                lines.append(f"  {title} ({len(keys)}): {shown}")
        lines.append("Check the model size matches the checkpoint; pass allow_missing=('norm.', 'head.') to load an "
                     "FCMAE checkpoint into a classifier, or ignore=('head.',) to drop a head with another class count.")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(converted, strict=False)
    report.loaded = sorted(converted)
    return report
