"""Import official iTPN / HiViT checkpoints (METHODS.md §4.7) into mimlab's ``HiViT`` + ``ITPNPyramid`` + heads.

Official layout (a model ``state_dict`` under ``'model'``, or ``'module'`` / ``'model_ema'`` / ``'state_dict'``,
optionally prefixed ``module.`` / ``encoder.``): one flat ``blocks`` list in which the two ``PatchMerge`` modules
**occupy list indices** (``m`` and ``2m+1`` for ``m`` C-MLP blocks per early stage: 3 and 7 for iTPN-B), then the
pyramid (``align_dim_*``, ``split_*``, ``block_16to8``, ``block_8to4``, ``fpn_modules``) and either the pixel decoder
(``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``) or
the CLIP heads (``decoder_embed``, ``lm_head``, ``lm_cls_head``, ``norm``, ``norm_cls``, ``cls_pt_layers``; there
``mask_token`` belongs to the backbone).

mimlab splits ``blocks`` into ``stage4 / merge4 / stage8 / merge8 / main_blocks``; every other name is kept.
The PatchMerge positions are found from the keys (the only blocks with ``reduction.weight``), so ``mlp_depth`` need
not be given; a checkpoint that does not fit that pattern, or whose shapes do not fit the model, raises with the keys.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from mimlab.checkpoints.files import load_file

NECK_PREFIXES = ("align_dim_", "split_", "block_16to8.", "block_8to4.", "fpn_modules.")
PIXEL_DECODER_PREFIXES = ("decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
CLIP_HEAD_PREFIXES = ("decoder_embed.", "lm_head.", "lm_cls_head.", "norm.", "norm_cls.", "cls_pt_layers.")
BACKBONE_PREFIXES = ("patch_embed.", "absolute_pos_embed", "blocks.", "fc_norm.", "head.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def load_checkpoint_file(path: Path) -> dict:
    """``torch.load`` with weights only; MAE-style files also pickle ``args`` (an ``argparse.Namespace``), which is
    allow-listed. OpenAI CLIP ``.pt`` files are TorchScript archives and are read with ``torch.jit.load``."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return load_file(path, weights_only=True)
    except RuntimeError as err:  # TorchScript archive
        if "TorchScript" not in str(err) and "jit" not in str(err).lower():
            raise
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def read_state_dict(source: str | Path | dict) -> dict[str, Tensor]:
    """A path or a loaded object -> flat state dict, unwrapping ``model``/``module``/``model_ema``/``state_dict`` and
    stripping ``module.`` / ``encoder.`` prefixes."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"iTPN checkpoint {path} does not exist (official weights are on Baidu/Google "
                                    "Drive only: download them yourself and pass the local path)")
        source = load_checkpoint_file(path)
    for key in ("model", "module", "model_ema", "state_dict"):
        if isinstance(source, dict) and key in source and isinstance(source[key], dict):
            source = source[key]
            break
    out = {}
    for k, v in source.items():
        for prefix in ("module.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _merge_indices(sd: dict[str, Tensor]) -> tuple[int, int]:
    merges = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k)) and m.group(2) == "reduction.weight"})
    if len(merges) != 2 or merges[1] != 2 * merges[0] + 1:
        raise ValueError(f"official iTPN layout expects two PatchMerge entries in 'blocks' at indices m and 2m+1; "
                         f"found 'blocks.<i>.reduction.weight' at {merges}. Is this an iTPN/HiViT checkpoint?")
    return merges[0], merges[1]


def _rename_block(index: int, rest: str, m: int) -> str:
    if index < m:
        return f"stage4.{index}.{rest}"
    if index == m:
        return f"merge4.{rest}"
    if index <= 2 * m:
        return f"stage8.{index - m - 1}.{rest}"
    if index == 2 * m + 1:
        return f"merge8.{rest}"
    return f"main_blocks.{index - 2 * m - 2}.{rest}"


def convert_official_itpn(state_dict: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split an official state dict into ``{"backbone", "neck", "decoder", "unused"}`` dicts in mimlab names.

    ``decoder`` holds the pixel decoder (``ITPNPixelDecoder``) or the CLIP heads (``ITPNClipHead``), whichever the
    checkpoint has; ``unused`` keeps what matched nothing (e.g. ``relative_position_index`` buffers).
    """
    sd = read_state_dict(state_dict)
    m, _ = _merge_indices(sd)
    is_clip = "lm_head.weight" in sd
    parts: dict[str, dict[str, Tensor]] = {"backbone": {}, "neck": {}, "decoder": {}, "unused": {}}
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            parts["unused"][k] = v
        elif (match := _BLOCK.match(k)) is not None:
            parts["backbone"][_rename_block(int(match.group(1)), match.group(2), m)] = v
        elif k.startswith(BACKBONE_PREFIXES) or (k == "mask_token" and is_clip):
            parts["backbone"][k] = v
        elif k.startswith(NECK_PREFIXES):
            parts["neck"][k] = v
        elif k.startswith(CLIP_HEAD_PREFIXES if is_clip else PIXEL_DECODER_PREFIXES + ("mask_token",)):
            parts["decoder"]["embed." + k if k.startswith("decoder_embed.") else k] = v
        else:
            parts["unused"][k] = v
    return parts


def _load_part(module: nn.Module, sd: dict[str, Tensor], name: str, allow_missing: tuple[str, ...]) -> None:
    own = module.state_dict()
    bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not any(a in k for a in allow_missing)]
    unexpected = [k for k in sd if k not in own]
    if bad_shape or missing or unexpected:
        raise ValueError(
            f"official iTPN checkpoint does not fit the {name} ({type(module).__name__}):\n"
            f"  shape mismatches: {bad_shape[:6]}\n  missing in checkpoint: {missing[:6]}\n"
            f"  not in model: {unexpected[:6]}\n"
            "Check embed_dim / mlp_depth / depth / fpn_depth / rpe of the model config against the checkpoint."
        )
    module.load_state_dict(sd, strict=False)


def load_official_itpn(source: str | Path | dict, backbone: nn.Module, neck: nn.Module | None = None,
                       decoder: nn.Module | None = None) -> dict[str, dict[str, Tensor]]:
    """Load an official checkpoint into the given modules (strict up to documented exceptions) and return the split.

    Allowed to be absent from the checkpoint: ``relative_position_bias_table`` (pre-training has rpe=False; fine-tuning
    starts the tables at zero, as the official code does), ``fc_norm``/``head`` (pre-training checkpoints have no
    classifier) and, in the backbone, ``mask_token`` (only CLIP checkpoints have one).
    """
    parts = convert_official_itpn(source)
    _load_part(backbone, parts["backbone"], "backbone",
               ("relative_position_bias_table", "fc_norm.", "head.", "mask_token"))
    if neck is not None:
        _load_part(neck, parts["neck"], "neck", ())
    if decoder is not None:
        _load_part(decoder, parts["decoder"], "decoder", ())
    return parts
