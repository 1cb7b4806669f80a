"""Official data2vec 2.0 image checkpoints (github.com/facebookresearch/fairseq ``examples/data2vec/models/
data2vec2.py`` ``Data2VecMultiModel``, ``modalities/{base,images,modules}.py``) in the names of
:class:`~mimlab.models.backbones.vit.MaskedViT` with ``post_norm=True``.

A fairseq file is ``{'model': state, 'cfg': ..., ...}``. The image encoder of the released recipe
(``layer_norm_first: false``, ``prenet_depth: 2``, ``num_extra_tokens: 1``, no ALiBi) is

* ``modality_encoders.IMAGE.local_encoder.proj.{weight (D,3,16,16), bias}`` -> ``patch_embed.proj.*``;
* ``modality_encoders.IMAGE.fixed_positional_encoder.positions (1,L,D)`` (fixed sin-cos, no cls row; older files:
  ``positional_encoder.pos_embed``) -> ``pos_embed (1,1+L,D)`` with a zero cls row, which adds nothing to the token;
* ``modality_encoders.IMAGE.extra_tokens (1,1,D)`` -> ``cls_token`` (it gets no position in either);
* ``modality_encoders.IMAGE.context_encoder.norm.*`` (the LayerNorm on the embeddings) -> ``norm_pre.*``;
* ``modality_encoders.IMAGE.context_encoder.blocks.i.*`` (P prenet blocks) -> ``blocks.i.*`` and ``blocks.j.*`` ->
  ``blocks.(P+j).*``; the post-LN ``AltBlock`` has timm's names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).

Left out: the decoder (``modality_encoders.IMAGE.decoder.*``), ``encoder_mask``, the other modalities, and ``_ema``:
the EMA teacher's fp32 state with the same names. Sub-models: ``student`` (default; fairseq's
``mae_image_classification`` fine-tunes it) or ``ema`` (that teacher). A fine-tuned file
(``mae_image_classification``: ``model.*`` + ``fc_norm.*`` + ``head.*``) loses the ``model.`` prefix and its head is
left out by the loader.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from mimlab.checkpoints.layout import CheckpointMismatchError, Converted, Layout, strip_prefix

IMAGE = "modality_encoders.IMAGE."
SUBMODELS = ("student", "ema")
_RENAMES = {
    "local_encoder.proj.": "patch_embed.proj.",
    "extra_tokens": "cls_token",
    "context_encoder.norm.": "norm_pre.",
}
_POSITIONS = ("fixed_positional_encoder.positions", "positional_encoder.pos_embed")
_PRENET = re.compile(r"^context_encoder\.blocks\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def matches(state: Mapping[str, Any]) -> bool:
    return any(k.startswith((IMAGE, "model." + IMAGE)) for k in state)


def _image_encoder(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(image encoder with ``modality_encoders.IMAGE.`` removed + the shared blocks, left-out keys) of a student or
    teacher state; keys it does not know stay, for the loader to report."""
    keep, left_out = {}, []
    for key, value in state.items():
        if key.startswith(IMAGE) and not key.startswith((IMAGE + "decoder.", IMAGE + "encoder_mask")):
            keep[key.removeprefix(IMAGE)] = value
        elif key == "_ema" or key.startswith(("modality_encoders.", "shared_decoder.", "recon_proj.")):
            left_out.append(key)
        else:
            keep[key] = value
    return keep, left_out


def convert(state: Mapping[str, Any], submodel: str | None = None) -> Converted:
    if any(k.startswith("model." + IMAGE) for k in state):  # fine-tuned: mae_image_classification's .model
        state = strip_prefix(state, "model.")
    source, left_out = _image_encoder(state)
    if submodel == "ema":
        teacher = state.get("_ema")
        if not isinstance(teacher, Mapping) or not matches(teacher):
            raise CheckpointMismatchError(
                f"this data2vec 2.0 file has no EMA teacher of the image encoder ('_ema' with '{IMAGE}*' keys; "
                "ema_encoder_only=true keeps only the blocks): load its student (drop '::ema')"
            )
        source, _ = _image_encoder(teacher)
        left_out = [f"the student ({sum(k != '_ema' for k in state)} tensors)"]
    if "context_encoder.norm.weight" not in source or "alibi_scale" in source:
        raise CheckpointMismatchError(
            "this data2vec 2.0 file is not the post-LN image encoder without ALiBi (layer_norm_first=false, "
            "use_alibi_encoder=false) that mimlab's MaskedViT(post_norm=true) builds"
        )
    prenet = 1 + max((int(m.group(1)) for k in source if (m := _PRENET.match(k))), default=-1)
    backbone: dict[str, Any] = {}
    for key, value in source.items():
        if key in _POSITIONS:
            cls_row = value.new_zeros(value.shape[0], 1, value.shape[2])
            backbone["pos_embed"] = torch.cat([cls_row, value], dim=1) if "extra_tokens" in source else value
        elif (m := _PRENET.match(key)) is not None:
            backbone[_PRENET.sub(f"blocks.{m.group(1)}.", key)] = value
        elif (m := _BLOCK.match(key)) is not None:
            backbone[_BLOCK.sub(f"blocks.{prenet + int(m.group(1))}.", key)] = value
        else:
            backbone[next((key.replace(a, b, 1) for a, b in _RENAMES.items() if key.startswith(a)), key)] = value
    notes = [f"the {prenet} prenet blocks (context_encoder.blocks) are blocks.0-{prenet - 1}, the shared blocks follow"]
    return Converted(backbone, left_out, notes)


LAYOUT = Layout("official data2vec 2.0 (fairseq)", matches, convert, SUBMODELS)
