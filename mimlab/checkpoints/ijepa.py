"""Official I-JEPA checkpoints (github.com/facebookresearch/ijepa ``src/train.py`` ``save_dict``,
``src/models/vision_transformer.py``) in the names of :class:`~mimlab.models.backbones.vit.MaskedViT` with
``class_token=False``.

A file (``IN1K-vit.h.14-300e.pth.tar``, ``IN1K-vit.h.16-448px-300e.pth.tar``, ``IN22K-vit.g.16-600e.pth.tar``, ...)
holds three models side by side, each the ``state_dict`` of a DistributedDataParallel module (``module.`` prefix):
``{'encoder', 'predictor', 'target_encoder', 'opt', 'scaler', 'epoch', 'loss', 'batch_size', 'world_size', 'lr'}``.
The encoders are plain ViTs without cls token: ``pos_embed (1,L,D)`` (fixed sin-cos), ``patch_embed.proj.{weight
(D,3,p,p), bias}``, ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm.*``: mimlab's names.

Sub-models: ``target_encoder`` (default: the EMA encoder, the weights the paper evaluates) or ``encoder`` (the
context encoder). The predictor is not an encoder and is always left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mimlab.checkpoints.layout import CheckpointMismatchError, Converted, Layout, strip_prefix

SUBMODELS = ("target_encoder", "encoder")
MODELS = (*SUBMODELS, "predictor")


def matches(checkpoint: Mapping[str, Any]) -> bool:
    """The top-level mapping holds the EMA encoder, or the context encoder beside the predictor."""
    present = {k for k in MODELS if isinstance(checkpoint.get(k), Mapping)}
    return "target_encoder" in present or {"encoder", "predictor"} <= present


def convert(checkpoint: Mapping[str, Any], submodel: str | None = None) -> Converted:
    name = submodel or SUBMODELS[0]
    chosen = checkpoint.get(name)
    if not isinstance(chosen, Mapping):
        held = [k for k in SUBMODELS if isinstance(checkpoint.get(k), Mapping)]
        raise CheckpointMismatchError(
            f"this I-JEPA file has no '{name}' state; it holds {', '.join(held)}: ask for one of them with "
            f"'::{held[0]}'"
        )
    left_out = [f"{k}.*" for k in MODELS if k != name and isinstance(checkpoint.get(k), Mapping)]
    return Converted(strip_prefix(chosen, "module."), left_out)


LAYOUT = Layout("official I-JEPA", matches, convert, SUBMODELS, raw=True)
