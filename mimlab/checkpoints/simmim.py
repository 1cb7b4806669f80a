"""Official SimMIM checkpoints (github.com/microsoft/SimMIM ``models/simmim.py``, ``vision_transformer.py``,
``swin_transformer.py``, ``utils.py``) in the names of :class:`~mimlab.models.backbones.mask_token_vit.MaskTokenViT`
(BEiT layout) and :class:`~mimlab.models.backbones.swin.MaskTokenSwin`.

A pre-training file (``simmim_pretrain__*.pth``) is ``{'model': SimMIM.state_dict(), ...}``: the encoder under
``encoder.``, the one-layer head as ``decoder.0.{weight,bias}`` (left out). A fine-tuned file has the encoder's names
without the prefix, plus ``head.*`` (and ``fc_norm.*`` for ViT), which the loader leaves out.

* **ViT** (BEiT layout): ``cls_token (1,1,D)``, ``mask_token (1,1,D)``, ``patch_embed.proj.{weight (D,3,p,p),bias}``,
  ``rel_pos_bias.relative_position_bias_table ((2g-1)²+3, heads)`` (one table shared by every block) and its
  ``relative_position_index`` buffer (rebuilt, left out), ``blocks.i.{gamma_1, gamma_2 (D,), norm1, attn.qkv.weight
  (3D,D), attn.q_bias, attn.v_bias (D,), attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm.*``: timm ``EvaBlock`` names,
  kept as they are. The fine-tuning recipe switches to one table per block (``blocks.i.attn.relative_position_bias_table``,
  ``USE_RPB``), which mimlab's BEiT ViT does not build: such a file is refused with that reason.
* **Swin**: ``patch_embed.{proj,norm}``, ``layers.s.blocks.b.{norm1, attn.relative_position_bias_table ((2w-1)², heads),
  attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``layers.s.downsample.{norm,reduction}`` for s = 0..2, ``norm``,
  ``mask_token``; buffers ``relative_position_index`` and ``attn_mask`` (rebuilt, left out). timm keeps each patch
  merging at the start of the next stage: ``layers.s.downsample`` -> ``layers.(s+1).downsample`` (same concatenation
  order, as timm's own ``checkpoint_filter_fn``). A file already in timm's naming passes unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mimlab.checkpoints.layout import CheckpointMismatchError, Converted, Layout, strip_prefix

_BUFFERS = ("relative_position_index", "attn_mask")
_SWIN_TABLE = re.compile(r"^(encoder\.)?layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$")
_OFFICIAL_MERGE = re.compile(r"^layers\.(\d+)\.downsample\.")


def _encoder(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(encoder tensors without ``encoder.``, left-out keys: the head ``decoder.*`` and rebuilt buffers)."""
    prefixed = any(k.startswith("encoder.") for k in state)
    keep, left_out = {}, []
    for key, value in state.items():
        if prefixed and not key.startswith("encoder."):
            left_out.append(key)
        elif key.rsplit(".", 1)[-1] in _BUFFERS:
            left_out.append(key)
        else:
            keep[key] = value
    return strip_prefix(keep, "encoder."), left_out


def matches_vit(state: Mapping[str, Any]) -> bool:
    """A BEiT-layout ViT: q/v biases and a relative position bias table (shared, or per block when fine-tuned)."""
    keys = set(strip_prefix(state, "encoder."))
    return "blocks.0.attn.q_bias" in keys and (
        "rel_pos_bias.relative_position_bias_table" in keys or "blocks.0.attn.relative_position_bias_table" in keys
    )


def convert_vit(state: Mapping[str, Any], submodel: str | None = None) -> Converted:
    backbone, left_out = _encoder(state)
    if "blocks.0.attn.relative_position_bias_table" in backbone:
        raise CheckpointMismatchError(
            "this SimMIM/BEiT ViT has one relative position bias table per block (blocks.<i>.attn."
            "relative_position_bias_table: the fine-tuning layout, USE_RPB); mimlab's BEiT ViT (mask_token_beit_*) "
            "shares one table across blocks as the pre-training does: load the pre-trained file "
            "(simmim_pretrain__vit_base__img224__800ep.pth) instead"
        )
    return Converted(backbone, left_out)


def matches_swin(state: Mapping[str, Any]) -> bool:
    """A Swin Transformer: per-block window relative position tables under ``layers.s.blocks.b``."""
    return any(_SWIN_TABLE.match(k) for k in state)


def convert_swin(state: Mapping[str, Any], submodel: str | None = None) -> Converted:
    backbone, left_out = _encoder(state)
    notes = []
    if "layers.0.downsample.reduction.weight" in backbone:  # official naming: merging at the end of stage s
        backbone = {
            _OFFICIAL_MERGE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k): v
            for k, v in backbone.items()
        }
        notes.append("patch mergings layers.<s>.downsample moved to timm's layers.<s+1>.downsample")
    return Converted(backbone, left_out, notes)


VIT = Layout("official SimMIM ViT (BEiT layout)", matches_vit, convert_vit)
SWIN = Layout("official Swin (SimMIM)", matches_swin, convert_swin)
