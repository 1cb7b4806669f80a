"""Export a checkpoint's backbone (+ classifier head) as a timm state dict.

``mimlab-export ckpt=PATH format=timm [out=PATH] [ema=true] [name=TIMM_NAME] [num_heads=H]``
(or ``python -m mimlab.checkpoints.export``)

Writes ``out`` (default ``<ckpt stem>.timm.pth``: a bare state dict) and ``<out>.json`` with the ``timm.create_model``
name and keyword arguments under which ``model.load_state_dict(torch.load(out), strict=True)`` holds. Inputs: mimlab
pre-training / fine-tuning / linear-probe ``.ckpt`` files and official MAE / ConvNeXt V2 files.

* ViT (MaskedViT, MAE): keys are timm's already. A fine-tuning head ``head.fc_norm``/``head.fc`` becomes ``fc_norm``/``head``
  (timm ``global_pool='avg'``, no final ``norm``); without a head the model is ``num_classes=0``, ``global_pool='token'``.
* Model name: timm's own name for the architecture when it registers one (``vit_base_patch16_224``, ``convnextv2_atto``
  ...), else a base model with every architecture argument (e.g. a 32-px ViT).
* ConvNeXt V2 (official dense naming): timm's ``convnext.checkpoint_filter_fn`` maps the names; the head becomes
  ``head.norm``/``head.fc``. An FCMAE (pre-training) encoder has no final norm: ``head.norm`` is written as the identity
  affine (weight 1, bias 0), as a freshly initialised timm model would have.
A linear-probe head (BatchNorm + Linear) has no timm equivalent: only the backbone is exported.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from mimlab.checkpoints.load import CheckpointMismatchError, pretrained_parts, read_checkpoint, read_state_dict

log = logging.getLogger(__name__)


def _config(path: str | Path) -> dict:
    ckpt = read_checkpoint(path)
    return ((ckpt.get("mimlab") or {}).get("config") or {}) if isinstance(ckpt, dict) else {}


def _head(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Fine-tuning head tensors (``fc_norm.*``, ``fc.*``) of a mimlab checkpoint; {} if none / a linear-probe head."""
    head = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith("bn.") for k in head):
        log.warning("linear-probe head (BatchNorm + Linear) has no timm equivalent: exporting the backbone only")
        return {}
    return head


def vit_to_timm(
    backbone: dict[str, Tensor], head: dict[str, Tensor], num_heads: int | None, cfg: dict
) -> tuple[dict, dict]:
    """(timm state dict, create_model kwargs) for a ViT backbone (+ FT head)."""
    out = {k: v for k, v in backbone.items()}
    dim, _, patch, _ = out["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in out if k.startswith("blocks.")})
    grid = int(round((out["pos_embed"].shape[1] - 1) ** 0.5))
    bcfg = (cfg.get("model") or {}).get("backbone") or {}
    heads = num_heads or bcfg.get("num_heads") or (16 if dim == 1280 else max(dim // 64, 1))
    mlp = out["blocks.0.mlp.fc1.weight"].shape[0] / dim
    kwargs: dict[str, Any] = dict(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=int(heads),
        mlp_ratio=mlp,
        num_classes=0,
        global_pool="token",
    )
    if head:
        out.pop("norm.weight", None), out.pop("norm.bias", None)
        out["fc_norm.weight"], out["fc_norm.bias"] = head["fc_norm.weight"], head["fc_norm.bias"]
        out["head.weight"], out["head.bias"] = head["fc.weight"], head["fc.bias"]
        kwargs.update(num_classes=int(head["fc.weight"].shape[0]), global_pool="avg")
    return out, kwargs


def convnext_to_timm(backbone: dict[str, Tensor], head: dict[str, Tensor], name: str | None) -> tuple[str, dict, dict]:
    """(timm model name, state dict, create_model kwargs) for a ConvNeXt V2 backbone in official dense naming (+ FT
    head). Without ``name``: timm's own model of exactly this architecture (``convnextv2_atto`` ... ``_huge``, whose
    small sizes use 1x1-conv MLPs), else ``convnextv2_base`` with ``depths``/``dims``."""
    from timm.models.convnext import checkpoint_filter_fn

    stages = sorted({int(k.split(".")[1]) for k in backbone if k.startswith("stages.")})
    depths = [len({k.split(".")[2] for k in backbone if k.startswith(f"stages.{s}.")}) for s in stages]
    dims = [int(backbone[f"stages.{s}.0.dwconv.weight"].shape[0]) for s in stages]
    official = dict(backbone)
    if head:
        official["norm.weight"], official["norm.bias"] = head["fc_norm.weight"], head["fc_norm.bias"]
        official["head.weight"], official["head.bias"] = head["fc.weight"], head["fc.bias"]
    elif "norm.weight" not in official:
        official["norm.weight"], official["norm.bias"] = torch.ones(dims[-1]), torch.zeros(dims[-1])
    plain = dict(num_classes=int(head["fc.weight"].shape[0]) if head else 0)
    for candidate in [] if name else timm.list_models("convnextv2_*"):
        model = _meta_model(candidate, **plain)
        try:
            state = checkpoint_filter_fn(official, model)
        except (KeyError, RuntimeError):  # another depth or width
            continue
        if _same_tensors(model, state):
            return candidate, state, plain
    name = name or "convnextv2_base"
    kwargs = dict(depths=depths, dims=dims, **plain)
    return name, checkpoint_filter_fn(official, _meta_model(name, **kwargs)), kwargs


def _meta_model(name: str, **kwargs: Any) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def _same_tensors(model: nn.Module, state: dict[str, Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == v.shape for k, v in state.items())


def registered_vit(state: dict[str, Tensor], kwargs: dict[str, Any]) -> str | None:
    """timm's own name (``vit_{tiny,small,base,large,huge,giant}_patch<P>_<size>``) of a ViT with exactly these
    tensors and heads, built with only ``num_classes`` and ``global_pool``; None if timm registers none."""
    sizes = ("tiny", "small", "base", "large", "huge", "giant")
    registered = set(timm.list_models("vit_*"))
    for name in (f"vit_{s}_patch{kwargs['patch_size']}_{kwargs['img_size']}" for s in sizes):
        if name in registered:
            model = _meta_model(name, num_classes=kwargs["num_classes"], global_pool=kwargs["global_pool"])
            if _same_tensors(model, state) and model.blocks[0].attn.num_heads == kwargs["num_heads"]:  # type: ignore[index, union-attr]
                return name
    return None


def export_timm(
    ckpt: str | Path,
    out: str | Path | None = None,
    ema: bool = False,
    name: str | None = None,
    num_heads: int | None = None,
) -> tuple[Path, str, dict]:
    """Write the timm state dict of ``ckpt``; return (path, timm model name, create_model kwargs).

    Without ``name`` the model is timm's own name for the architecture when timm registers one (then only
    ``num_classes`` / ``global_pool`` are needed), else a base model with every architecture argument."""
    ckpt = Path(ckpt)
    prefix = "ema.module." if ema else ""
    raw = read_state_dict(ckpt)
    if ema and not any(k.startswith(prefix) for k in raw):
        raise CheckpointMismatchError(f"{ckpt} has no model-EMA weights ('ema.module.*'); drop ema=true")
    parts, layout = pretrained_parts(ckpt, prefix=prefix)
    backbone = {
        k: v
        for k, v in parts["backbone"].items()  # official fine-tuned heads are not exported
        if layout == "mimlab" or not k.startswith(("head.", "fc_norm."))
    }
    head = _head(raw, prefix + "head.") if layout == "mimlab" else {}
    cfg = _config(ckpt)
    if "cls_token" in backbone and "blocks.0.attn.qkv.weight" in backbone:
        state, kwargs = vit_to_timm(backbone, head, num_heads, cfg)
        registered = None if name else registered_vit(state, kwargs)
        if registered:
            name, kwargs = registered, {k: kwargs[k] for k in ("num_classes", "global_pool")}
        name = name or "vit_base_patch16_224"
    elif "downsample_layers.0.0.weight" in backbone:
        name, state, kwargs = convnext_to_timm(backbone, head, name)
    else:
        raise CheckpointMismatchError(
            f"{ckpt}: export format=timm supports ViT (cls_token, blocks.*) and ConvNeXt V2 "
            "(downsample_layers.*, stages.*) backbones; this one has neither (HiViT/iTPN have no timm model)"
        )
    out = Path(out) if out is not None else ckpt.with_suffix(".timm.pth")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, out)
    out.with_suffix(out.suffix + ".json").write_text(json.dumps({"model_name": name, "kwargs": kwargs}, indent=2))
    return out, name, kwargs


USAGE = "mimlab-export ckpt=PATH [format=timm] [out=PATH] [ema=true] [name=TIMM_NAME] [num_heads=H]"
OPTIONS = {
    "ckpt": "mimlab .ckpt (pre-training, fine-tuning, linear probe) or official MAE / ConvNeXt V2 file (required)",
    "format": "timm (the only format so far)",
    "out": "state dict to write (default <ckpt stem>.timm.pth); <out>.json gets the timm.create_model call",
    "ema": "true: export the model-EMA weights of a fine-tuning run with task.ema_decay (default false)",
    "name": "timm model name (default vit_base_patch16_224 for ViT, convnextv2_base for ConvNeXt V2)",
    "num_heads": "attention heads of a ViT (default: the checkpoint's config, else embed_dim / 64)",
}


def main(argv: list[str] | None = None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        width, summary = max(map(len, OPTIONS)), __doc__.split("\n\n", 1)[0]
        print(f"usage: {USAGE}\n\n{summary}\n\noptions (key=value):")
        print("\n".join(f"  {key:<{width}}  {text}" for key, text in OPTIONS.items()))
        return
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(args) - set(OPTIONS)) + [a for a in argv if "=" not in a]
    if "ckpt" not in args or unknown:
        named = f" (unknown: {', '.join(unknown)})" if unknown else ""
        raise SystemExit(f"usage: {USAGE}{named}; --help lists the options")
    if args.get("format", "timm") != "timm":
        raise SystemExit(f"format={args['format']} is not supported; use format=timm")
    path, name, kwargs = export_timm(
        args["ckpt"],
        args.get("out"),
        args.get("ema", "false").lower() == "true",
        args.get("name"),
        int(args["num_heads"]) if "num_heads" in args else None,
    )
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(
        f"wrote {path}\nload with: m = timm.create_model({name!r}, pretrained=False, {call}); "
        f"m.load_state_dict(torch.load({str(path)!r}), strict=True)"
    )


if __name__ == "__main__":
    main()
