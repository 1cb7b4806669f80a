"""Official MaskFeat image checkpoints (github.com/facebookresearch/SlowFast ``slowfast/models/masked.py``
``MaskMViT``, ``video_model_builder.py`` ``MViT``, ``head_helper.py`` ``MSSeparateHead``, ``utils/checkpoint.py``) in
the names of :class:`~mimlab.models.backbones.mask_token_vit.MaskTokenViT`.

A file (``in1k_VIT_{B,L}_MaskFeat_PT_epoch_01600.pyth``) is ``{'model_state': ..., 'optimizer_state', 'epoch',
'cfg': <yaml text>}``. ``MViT`` with ``PATCH_2D`` and no pooling is a plain ViT: ``cls_token (1,1,D)``, learned
``pos_embed (1,1+L,D)``, ``patch_embed.proj.{weight (D,3,16,16),bias}``, ``blocks.i.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}`` (timm's ``Block`` names), ``mask_token (1,1,D)``. ``MaskMViT`` deletes the encoder's final norm:
its prediction head is ``pred_head.transforms.0.0`` (a LayerNorm on the last block's tokens) then
``pred_head.projections.0`` (Linear D -> 108 HOG values). mimlab's MaskFeat encoder keeps that LayerNorm as its
final ``norm`` (docs/maskfeat.md, row 1), so ``pred_head.transforms.0.0.*`` -> ``norm.*``; the projection and the HOG
filters (``hogs.0.weight_x/weight_y``) are left out.

A fine-tuned ``MViT`` (``head.projection.*``, ``USE_MEAN_POOLING``) applies ``norm`` to the mean of the patch tokens,
i.e. it is the fine-tuning head's ``fc_norm``: ``norm.*`` -> ``fc_norm.*``, ``head.projection.*`` -> ``head.*``, both
left out by the loader as a classifier head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mimlab.checkpoints.layout import CheckpointMismatchError, Converted, Layout

_HEAD_NORM = "pred_head.transforms.0.0."


def matches(state: Mapping[str, Any]) -> bool:
    """SlowFast's ViT: the MaskFeat prediction head, or a fine-tuned model's ``head.projection``."""
    return "pred_head.projections.0.weight" in state or "head.projection.weight" in state


def convert(state: Mapping[str, Any], submodel: str | None = None) -> Converted:
    if any(k.startswith(("pred_head.projections.1.", "pred_head.transforms.0.1.")) for k in state):
        raise CheckpointMismatchError(
            "this MaskFeat file predicts from several blocks or through transformer head blocks (MASK.PRETRAIN_DEPTH "
            "with more than one entry, or HEAD_TYPE separate_xformer); only the image recipe's one LayerNorm + Linear "
            "head (in1k_VIT_*_MaskFeat_PT) is read"
        )
    backbone, left_out, notes = {}, [], []
    for key, value in state.items():
        if key.startswith(_HEAD_NORM):
            backbone["norm." + key.removeprefix(_HEAD_NORM)] = value
        elif key.startswith(("pred_head.", "hogs.")):
            left_out.append(key)
        elif key.startswith("head.projection."):
            backbone["head." + key.removeprefix("head.projection.")] = value
        elif key.startswith("norm.") and "head.projection.weight" in state:
            backbone["fc_norm." + key.removeprefix("norm.")] = value
        else:
            backbone[key] = value
    if "norm.weight" in backbone:
        notes.append("the prediction head's LayerNorm (pred_head.transforms.0.0) is the encoder's final norm")
    elif "fc_norm.weight" in backbone:
        notes.append("a fine-tuned MViT: its norm (after mean pooling) is the head's fc_norm, left out with the head")
    return Converted(backbone, left_out, notes)


LAYOUT = Layout("official MaskFeat (SlowFast ViT)", matches, convert)
