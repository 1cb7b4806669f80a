"""Rebuild the encoder of a checkpoint as a mimlab backbone with its trained weights (export, evaluation).

A mimlab checkpoint names its backbone in its resolved config (``model.backbone``, a ``_target_`` node); a file
without one (official MAE / ConvNeXt V2 weights, or a bare mimlab state dict) is described from its tensor shapes.
A fine-tuned ViT has no final norm (fine-tuning replaced it by the head's ``fc_norm``): the rebuilt encoder then has
none either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from mimlab.checkpoints.load import (
    CheckpointMismatchError,
    fit_state,
    pretrained_parts,
    read_checkpoint,
    read_state_dict,
)


@dataclass
class CheckpointEncoder:
    """``backbone`` (eval mode, trained weights); ``node``: the config that builds it; ``head``: a fine-tuning
    head's tensors (``fc_norm.*``, ``fc.*``; empty without one); ``final_norm``: False for a fine-tuned encoder;
    ``config``: the checkpoint's resolved config ({} for other files)."""

    backbone: nn.Module
    node: dict[str, Any]
    head: dict[str, Tensor]
    final_norm: bool
    config: dict[str, Any]

    def fresh(self, seed: int = 0) -> nn.Module:
        """The same architecture with its own random initialisation (seeded), in eval mode."""
        torch.manual_seed(seed)
        return build_backbone(self.node, self.final_norm)


def build_backbone(node: Mapping[str, Any], final_norm: bool = True) -> nn.Module:
    """Instantiate a backbone config node (eval mode); ``final_norm=False`` replaces a LayerNorm ``norm`` by Identity."""
    backbone = instantiate({**node, "_convert_": "all"})
    if not final_norm and isinstance(getattr(backbone, "norm", None), nn.LayerNorm):
        backbone.norm = nn.Identity()
    return backbone.eval()


def inferred_node(backbone: Mapping[str, Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """The backbone config of a file without one (ViT or ConvNeXt V2 tensors), from its tensor shapes."""
    if "patch_embed.proj.weight" in backbone and "blocks.0.attn.qkv.weight" in backbone:
        dim, _, patch, _ = backbone["patch_embed.proj.weight"].shape
        prefix = int("cls_token" in backbone)
        grid = int(round((backbone["pos_embed"].shape[1] - prefix) ** 0.5))
        return dict(
            _target_="mimlab.models.backbones.vit.MaskedViT",
            img_size=grid * patch,
            patch_size=patch,
            embed_dim=dim,
            depth=len({k.split(".")[1] for k in backbone if k.startswith("blocks.")}),
            num_heads=num_heads or (16 if dim == 1280 else max(dim // 64, 1)),
            mlp_ratio=backbone["blocks.0.mlp.fc1.weight"].shape[0] / dim,
            class_token=bool(prefix),
        )
    if "downsample_layers.0.0.weight" in backbone:
        stages = sorted({int(k.split(".")[1]) for k in backbone if k.startswith("stages.")})
        return dict(
            _target_="mimlab.models.backbones.convnextv2.MaskedConvNeXtV2",
            depths=[len({k.split(".")[2] for k in backbone if k.startswith(f"stages.{s}.")}) for s in stages],
            dims=[int(backbone[f"stages.{s}.0.dwconv.weight"].shape[0]) for s in stages],
        )
    raise CheckpointMismatchError(
        "this file has no model.backbone config and its tensors are neither a ViT (patch_embed, blocks.*) nor a "
        "ConvNeXt V2 (downsample_layers.*, stages.*): use a mimlab checkpoint of this encoder instead"
    )


def _head(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Fine-tuning head tensors (``fc_norm.*``, ``fc.*``) of a mimlab checkpoint; {} for none or a linear-probe head
    (BatchNorm + Linear, which only a linear probe uses)."""
    head = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {} if any(k.startswith("bn.") for k in head) else head


def checkpoint_encoder(path: str | Path, ema: bool = False, num_heads: int | None = None) -> CheckpointEncoder:
    """The encoder of ``path`` with its weights (the model-EMA copy with ``ema``); ``num_heads`` for a ViT file
    without a config (default embed_dim / 64)."""
    checkpoint = read_checkpoint(path)
    prefix = "ema.module." if ema else ""
    raw = read_state_dict(checkpoint)
    if ema and not any(k.startswith(prefix) for k in raw):
        raise CheckpointMismatchError(f"{path} has no model-EMA weights ('ema.module.*'); drop ema=true")
    parts, layout = pretrained_parts(checkpoint, prefix=prefix)
    config = ((checkpoint.get("mimlab") or {}).get("config") or {}) if isinstance(checkpoint, Mapping) else {}
    node = ((config.get("model") or {}).get("backbone") or {}) if layout == "mimlab" else {}
    if "_target_" not in node:
        node = inferred_node(parts["backbone"], num_heads or node.get("num_heads"))
    backbone = build_backbone(node)
    final_norm = "norm.weight" in parts["backbone"] or not isinstance(getattr(backbone, "norm", None), nn.LayerNorm)
    if not final_norm:
        backbone.norm = nn.Identity()
    unused = getattr(backbone, "checkpoint_unused_keys", ())
    fit_state(backbone, parts["backbone"], str(path), layout, ignore_unexpected=unused)
    head = _head(raw, prefix + "head.") if layout == "mimlab" else {}
    return CheckpointEncoder(backbone.eval(), dict(node), head, final_norm, config)
