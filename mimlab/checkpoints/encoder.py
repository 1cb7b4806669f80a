"""Rebuild the encoder of a checkpoint as a mimlab backbone with its trained weights (export, evaluation).

A mimlab checkpoint names its backbone in its resolved config (``model.backbone``, a ``_target_`` node); a file
without one (the official files :func:`mimlab.checkpoints.load.pretrained_parts` reads, or a bare mimlab state dict) is
described from its converted tensor shapes (:func:`inferred_node`). A fine-tuned ViT has no final norm (fine-tuning
replaced it by the head's ``fc_norm``): the rebuilt encoder then has none either. ``path::submodel`` picks a model of a
file that holds several (I-JEPA ``::encoder``, data2vec 2.0 ``::ema``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from mimlab.checkpoints.files import read_checkpoint, read_state_dict
from mimlab.checkpoints.load import CheckpointMismatchError, fit_state, pretrained_parts, split_submodel
from mimlab.models.backbones.contract import check_backbone

_HEADS = {1280: 16, 1408: 16}  # ViT-H (80-d heads) and I-JEPA's ViT-g (88-d); every other width has 64-d heads
_EVA_BLOCK = {"_target_": "timm.models.eva.EvaBlock", "_partial_": True, "qkv_bias": True, "qkv_fused": True}


@dataclass
class CheckpointEncoder:
    """``backbone`` (eval mode, trained weights); ``node``: the config that builds it; ``head``: a fine-tuning
    head's tensors (``fc_norm.*``, ``fc.*``; empty without one); ``final_norm``: False for a fine-tuned encoder;
    ``config``: the checkpoint's resolved config ({} for other files); ``layout``: the file layout it was read as
    ("mimlab", "official I-JEPA, target_encoder", ...)."""

    backbone: nn.Module
    node: dict[str, Any]
    head: dict[str, Tensor]
    final_norm: bool
    config: dict[str, Any]
    layout: str = "mimlab"

    def fresh(self, seed: int = 0) -> nn.Module:
        """The same architecture with its own random initialisation (seeded), in eval mode."""
        torch.manual_seed(seed)
        return build_backbone(self.node, self.final_norm)


def build_backbone(node: Mapping[str, Any], final_norm: bool = True) -> nn.Module:
    """Instantiate a backbone config node (eval mode); ``final_norm=False``: without the final norm that global-pool
    fine-tuning drops (the contract's ``drop_final_norm``)."""
    backbone = instantiate({**node, "_convert_": "all"})
    if not final_norm:
        check_backbone(backbone).drop_final_norm()
    return backbone.eval()


def inferred_node(backbone: Mapping[str, Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """The backbone config of a file without one, from its tensor shapes (mimlab names, after conversion): a ViT
    (:func:`_vit_node`), a Swin (:func:`_swin_node`) or a ConvNeXt V2."""
    if "layers.0.blocks.0.attn.relative_position_bias_table" in backbone:
        return _swin_node(backbone)
    if "patch_embed.proj.weight" in backbone and "blocks.0.attn.qkv.weight" in backbone:
        return _vit_node(backbone, num_heads)
    if "downsample_layers.0.0.weight" in backbone:
        stages = sorted({int(k.split(".")[1]) for k in backbone if k.startswith("stages.")})
        return dict(
            _target_="mimlab.models.backbones.convnextv2.MaskedConvNeXtV2",
            depths=[len({k.split(".")[2] for k in backbone if k.startswith(f"stages.{s}.")}) for s in stages],
            dims=[int(backbone[f"stages.{s}.0.dwconv.weight"].shape[0]) for s in stages],
        )
    raise CheckpointMismatchError(
        "this file has no model.backbone config and its tensors are neither a ViT (patch_embed, blocks.*), a Swin "
        "(layers.*) nor a ConvNeXt V2 (downsample_layers.*, stages.*): use a mimlab checkpoint of this encoder instead"
    )


def _vit_node(backbone: Mapping[str, Tensor], num_heads: int | None) -> dict[str, Any]:
    """A ViT: a cls token if the file has one (none: I-JEPA); ``mask_token`` -> :class:`MaskTokenViT` (SimMIM,
    MaskFeat); ``norm_pre`` -> the post-LN layout (data2vec 2.0); a shared relative position table -> the BEiT layout
    (SimMIM: ``EvaBlock`` with layer scale when the file has ``gamma_1``, grid and heads read off the table). The
    readout is the patch-token mean where the method trains no cls token (mask-token and post-LN encoders, or none)."""
    dim, _, patch, _ = backbone["patch_embed.proj.weight"].shape
    prefix = int("cls_token" in backbone)
    table = backbone.get("rel_pos_bias.relative_position_bias_table")
    if table is not None:  # ((2g-1)² + 3, heads)
        grid, heads = (math.isqrt(table.shape[0] - 3) + 1) // 2, int(table.shape[1])
    else:
        grid = int(round((backbone["pos_embed"].shape[1] - prefix) ** 0.5))
        heads = num_heads or _HEADS.get(dim, max(dim // 64, 1))
    mask_token = "mask_token" in backbone
    node: dict[str, Any] = dict(
        _target_="mimlab.models.backbones." + ("mask_token_vit.MaskTokenViT" if mask_token else "vit.MaskedViT"),
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=len({k.split(".")[1] for k in backbone if k.startswith("blocks.")}),
        num_heads=heads,
        mlp_ratio=backbone["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        class_token=bool(prefix),
    )
    if "norm_pre.weight" in backbone:
        node["post_norm"] = True
    if table is not None:
        init_values = 0.1 if "blocks.0.gamma_1" in backbone else None
        node.update(
            abs_pos_embed="pos_embed" in backbone, rel_pos_bias=True, block={**_EVA_BLOCK, "init_values": init_values}
        )
    if prefix and (mask_token or node.get("post_norm")):
        node["global_pool"] = "avg"
    return node


def _swin_node(backbone: Mapping[str, Tensor]) -> dict[str, Any]:
    """A Swin: widths, depths and heads from the tables; the window is the first stage's, and the image size makes the
    last stage one window wide (as in every released SimMIM / Swin config: 192 px with window 6 or 12, 224 with 7)."""
    stages = sorted({int(k.split(".")[1]) for k in backbone if k.startswith("layers.")})
    tables = [backbone[f"layers.{s}.blocks.0.attn.relative_position_bias_table"] for s in stages]
    windows = [(math.isqrt(t.shape[0]) + 1) // 2 for t in tables]
    dim, _, patch, _ = backbone["patch_embed.proj.weight"].shape
    return dict(
        _target_="mimlab.models.backbones.swin.MaskTokenSwin",
        img_size=windows[-1] * patch * 2 ** (len(stages) - 1),
        patch_size=patch,
        window_size=windows[0],
        embed_dim=dim,
        depths=[len({k.split(".")[3] for k in backbone if k.startswith(f"layers.{s}.blocks.")}) for s in stages],
        num_heads=[int(t.shape[1]) for t in tables],
        mlp_ratio=backbone["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / dim,
    )


def _head(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Fine-tuning head tensors (``fc_norm.*``, ``fc.*``) of a mimlab checkpoint; {} for none or a linear-probe head
    (BatchNorm + Linear, which only a linear probe uses)."""
    head = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {} if any(k.startswith("bn.") for k in head) else head


def checkpoint_encoder(path: str | Path, ema: bool = False, num_heads: int | None = None) -> CheckpointEncoder:
    """The encoder of ``path`` (``path::submodel`` for one model of a file that holds several) with its weights (the
    model-EMA copy of a mimlab fine-tuning run with ``ema``); ``num_heads`` for a ViT file without a config and without
    a relative position table (default embed_dim / 64; 16 for ViT-H and ViT-g)."""
    file, submodel = split_submodel(path)
    checkpoint = read_checkpoint(file)
    prefix = "ema.module." if ema else ""
    raw = read_state_dict(checkpoint)
    if ema and not any(k.startswith(prefix) for k in raw):
        raise CheckpointMismatchError(f"{path} has no model-EMA weights ('ema.module.*'); drop ema=true")
    parts, layout = pretrained_parts(checkpoint, prefix=prefix, submodel=submodel, name=str(path))
    config = ((checkpoint.get("mimlab") or {}).get("config") or {}) if isinstance(checkpoint, Mapping) else {}
    node = ((config.get("model") or {}).get("backbone") or {}) if layout == "mimlab" else {}
    if "_target_" not in node:
        node = inferred_node(parts["backbone"], num_heads or node.get("num_heads"))
    backbone = build_backbone(node)
    # a file without the final norm's weights comes from global-pool fine-tuning, which dropped it (MAE's ViT)
    declared = check_backbone(backbone)
    final_norm = "norm.weight" in parts["backbone"] or not declared.drop_final_norm()
    optional, unused = declared.checkpoint_optional_keys, declared.checkpoint_unused_keys
    fit_state(backbone, parts["backbone"], str(path), layout, allow_missing=optional, ignore_unexpected=unused)
    head = _head(raw, prefix + "head.") if layout == "mimlab" else {}
    return CheckpointEncoder(backbone.eval(), dict(node), head, final_norm, config, layout)
