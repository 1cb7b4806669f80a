"""Export a checkpoint's encoder (+ fine-tuning head) so it loads outside mimlab, checked to compute the same thing.

``mimlab-export ckpt=PATH [out=PATH] [ema=true] [num_heads=H]`` (or ``python -m mimlab.checkpoints.export``)

The encoder is rebuilt from the checkpoint (its ``model.backbone`` config; released files (docs/checkpoints.md,
``PATH::submodel`` for one model of a file that holds several) and mimlab files without a config from their tensor
shapes) and asked for its timm equivalent (``to_timm``, backbone
contract). Two formats, each a bare state dict ``out`` plus ``<out>.json`` saying how to build the model:

* **timm** (ViT, the BEiT-style ViT of SimMIM, MaskFeat's and I-JEPA's ViTs, ConvNeXt V2, Swin):
  ``{"model_name", "kwargs"}`` for ``timm.create_model(model_name, pretrained=False, **kwargs)``, which loads ``out``
  with ``strict=True``. ``model_name`` is timm's own name for the architecture when timm registers one
  (``vit_base_patch16_224``, ``convnextv2_atto`` ...; then ``kwargs`` holds only ``num_classes``/``global_pool``).
  The readout is the encoder's ``global_pool`` ("avg", the mean of the patch tokens, unless a recipe asks for the
  cls token: "token"). Default ``out``: ``<ckpt stem>.timm.pth``.
* **mimlab** (HiViT / iTPN and the post-norm ViT of data2vec 2.0, which timm does not build):
  ``{"mimlab_backbone": <the backbone's config node>, "readout": pool}``; :func:`load_exported` builds it. Default
  ``out``: ``<ckpt stem>.mimlab.pth``.

Before it reports success the export builds the written model from the written files and compares its pooled
features (and logits, with a head) with the mimlab encoder's on a fixed random batch; a difference removes the
files and raises :class:`ExportMismatchError`, so no file loads into a different network. A linear-probe head
(BatchNorm + Linear) has no timm equivalent: only the encoder is exported. ``out`` may not be the input file.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from mimlab.checkpoints.encoder import build_backbone, checkpoint_encoder
from mimlab.checkpoints.files import load_file
from mimlab.checkpoints.load import split_submodel
from mimlab.models.backbones.contract import Backbone, check_backbone

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # max |difference| / max(1, max |feature|) between the exported model and the mimlab encoder


class ExportMismatchError(RuntimeError):
    """The exported model does not compute what the mimlab encoder computes; nothing was written."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: ``path`` (state dict), ``spec`` (the ``<path>.json`` content), the load command."""

    path: Path
    spec: dict[str, Any]
    load_command: str

    @property
    def format(self) -> str:
        return "timm" if "model_name" in self.spec else "mimlab"


def _probe_images(backbone: Backbone) -> Tensor:
    size = backbone.img_size or 64
    return torch.randn(2, 3, int(size), int(size), generator=torch.Generator().manual_seed(0))


def _check(ours: Tensor, theirs: Tensor, what: str) -> None:
    scale = max(1.0, float(ours.abs().max()))
    diff = float((ours - theirs).abs().max()) / scale
    if not diff <= TOLERANCE:
        raise ExportMismatchError(
            f"the exported model's {what} differ from the mimlab encoder's by {diff:.3g} (relative; tolerance "
            f"{TOLERANCE}): the export does not build the same network, so nothing was written. Please report this "
            "with the checkpoint's model.backbone config."
        )


def _timm_model(name: str, kwargs: dict[str, Any], state: dict[str, Tensor] | None) -> nn.Module:
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def load_exported(path: str | Path, random_init: bool = False) -> nn.Module:
    """The model an export wrote (``<path>.json`` beside it), in eval mode: a timm model, or the mimlab backbone of a
    mimlab-format export; ``random_init`` builds the same architecture with its own initialisation instead."""
    path = Path(path)
    spec_path = path.with_suffix(path.suffix + ".json")
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} not found: {path} is not a mimlab-export output (it writes both files)")
    spec = json.loads(spec_path.read_text())
    state = None if random_init else load_file(path)
    if "model_name" in spec:
        return _timm_model(spec["model_name"], spec["kwargs"], state)
    backbone = build_backbone(spec["mimlab_backbone"], spec.get("final_norm", True))
    if state is not None:
        backbone.load_state_dict(state, strict=True)
    return backbone.eval()


def exported_features(model: nn.Module, images: Tensor) -> Tensor:
    """Pooled features (N, D) of a :func:`load_exported` model: timm's pre-logits, or the backbone's readout."""
    if hasattr(model, "forward_pooled"):
        return model.forward_pooled(images)  # type: ignore[operator]
    return model.forward_head(model.forward_features(images), pre_logits=True)  # type: ignore[operator]


def _default_out(ckpt: Path, fmt: str) -> Path:
    """``<stem>.<fmt>.pth`` beside the file (``<stem>.<submodel>.<fmt>.pth`` for ``file::submodel``)."""
    file, submodel = split_submodel(ckpt)
    return Path(file).with_suffix(f".{submodel}.{fmt}.pth" if submodel else f".{fmt}.pth")


def _write(out: Path, ckpt: Path, state: dict[str, Tensor], spec: dict[str, Any]) -> None:
    if out.resolve() == Path(split_submodel(ckpt)[0]).resolve():
        raise ValueError(f"out={out} is the checkpoint being exported; choose another path (it would be overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, out)
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(spec, indent=2))


def _remove(out: Path) -> None:
    out.unlink(missing_ok=True)
    out.with_suffix(out.suffix + ".json").unlink(missing_ok=True)


def export(
    ckpt: str | Path, out: str | Path | None = None, ema: bool = False, num_heads: int | None = None
) -> Exported:
    """Write the encoder of ``ckpt`` in the timm format where timm builds it, else the mimlab format (module
    docstring); verified against the mimlab encoder before returning."""
    ckpt = Path(ckpt)
    encoder = checkpoint_encoder(ckpt, ema, num_heads)
    backbone, node, head, final_norm = encoder.backbone, encoder.node, encoder.head, encoder.final_norm
    declared = check_backbone(backbone)
    equivalent = declared.to_timm(head or None)
    images = _probe_images(declared)
    if equivalent is not None:
        out = Path(out) if out is not None else _default_out(ckpt, "timm")
        spec: dict[str, Any] = {"model_name": equivalent.name, "kwargs": equivalent.kwargs}
        _write(out, ckpt, equivalent.state_dict, spec)
        try:
            with torch.no_grad():
                model = load_exported(out)
                pooled = equivalent.reference(images)
                _check(pooled, exported_features(model, images), "pooled features")
                if head:
                    _check(nn.functional.linear(pooled, head["fc.weight"], head["fc.bias"]), model(images), "logits")
        except Exception:
            _remove(out)
            raise
        call = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
        command = (
            f"m = timm.create_model({equivalent.name!r}, pretrained=False, {call}); "
            f"m.load_state_dict(torch.load({str(out)!r}), strict=True)"
        )
        return Exported(out, spec, command)
    if head:
        log.warning(
            "%s has no timm equivalent: exporting the encoder without its fine-tuning head", type(backbone).__name__
        )
    out = Path(out) if out is not None else _default_out(ckpt, "mimlab")
    spec = {"mimlab_backbone": node, "readout": backbone.global_pool, "final_norm": final_norm}
    _write(out, ckpt, backbone.state_dict(), spec)
    try:
        with torch.no_grad():
            _check(backbone.forward_pooled(images), load_exported(out).forward_pooled(images), "pooled features")  # type: ignore[operator]
    except Exception:
        _remove(out)
        raise
    command = f"from mimlab.checkpoints.export import load_exported; m = load_exported({str(out)!r})"
    return Exported(out, spec, command)


USAGE = "mimlab-export ckpt=PATH [out=PATH] [ema=true] [num_heads=H]"
OPTIONS = {
    "ckpt": "mimlab .ckpt (pre-training, fine-tuning, linear probe) or released file (docs/checkpoints.md; "
    "PATH::submodel) (required)",
    "format": "timm (default; where timm has no such model, the mimlab format is written, see --help)",
    "out": "state dict to write (default <ckpt stem>.timm.pth or .mimlab.pth); <out>.json says how to build it",
    "ema": "true: export the model-EMA weights of a fine-tuning run with task.ema_decay (default false)",
    "num_heads": "attention heads of a ViT file without a config (default embed_dim / 64)",
}


def main(argv: list[str] | None = None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        width = max(map(len, OPTIONS))
        print(f"usage: {USAGE}\n\n{__doc__}\noptions (key=value):")
        print("\n".join(f"  {key:<{width}}  {text}" for key, text in OPTIONS.items()))
        return
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(args) - set(OPTIONS)) + [a for a in argv if "=" not in a]
    if "ckpt" not in args or unknown:
        named = f" (unknown: {', '.join(unknown)})" if unknown else ""
        raise SystemExit(f"usage: {USAGE}{named}; --help lists the options")
    if args.get("format", "timm") != "timm":
        raise SystemExit(f"format={args['format']} is not supported; use format=timm")
    try:
        result = export(
            args["ckpt"],
            args.get("out"),
            args.get("ema", "false").lower() == "true",
            int(args["num_heads"]) if "num_heads" in args else None,
        )
    except ValueError as err:
        raise SystemExit(str(err)) from None
    note = "" if result.format == "timm" else ", timm has no such model"
    print(
        f"wrote {result.path} ({result.format} format{note}; checked against the mimlab encoder)\n"
        f"load with: {result.load_command}"
    )


if __name__ == "__main__":
    main()
