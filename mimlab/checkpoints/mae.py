"""Backbone weights from a pre-training checkpoint: mimlab ``.ckpt`` files and official MAE / ConvNeXt V2 / iTPN files.

* mimlab Lightning checkpoints: ``state_dict`` keys ``backbone.*`` (the prefix is stripped; decoder/target/neck are ignored).
* Official MAE (``mae_pretrain_vit_*.pth``, ``*_full.pth``, ``mae_finetuned_*``): ``{'model': {...}}`` with the encoder at the
  top level (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``, ``norm.*``); decoder keys are dropped.
* Official ConvNeXt V2 FCMAE (``{'model': ...}``, dense naming, or Minkowski ``encoder.*`` / ``kernel`` naming, which is
  converted: conv ``kernel (k², in, out) -> (out, in, k, k)``, depthwise ``(k², C) -> (C, 1, k, k)``, biases ``(1, C) -> (C,)``,
  GRN params reshaped to the model's shape).
* Official iTPN / HiViT: the flat ``blocks`` list (PatchMerges at indices) is split by ``mimlab.checkpoints.itpn``
  (stage4 / merge4 / stage8 / merge8 / main_blocks); pyramid and decoder keys are dropped.

Every mismatch is reported at once: missing, unexpected and shape-mismatched keys, with the file name.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from mimlab.checkpoints.load import CheckpointMismatchError, read_state_dict

log = logging.getLogger(__name__)

# Official pre-training checkpoints carry these non-backbone parts (MAE decoder, FCMAE decoder, iTPN pyramid + decoder).
OFFICIAL_NON_BACKBONE = (
    "mask_token", "decoder*", "decoder_*", "proj.*", "pred.*", "head.*", "fc_norm.*",
    "align_dim_*", "split_*", "block_16to8.*", "block_8to4.*", "fpn_modules.*",
    "lm_head*", "lm_cls_head*", "norm_cls*", "cls_pt_layers*",
)


def _strip(state: dict[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def remap_minkowski(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """FCMAE sparse (Minkowski) names and shapes -> dense ConvNeXt V2 names and shapes (no-op on dense checkpoints)."""
    out = {}
    for key, value in state.items():
        key = key.replace(".ln.", ".").replace(".linear.", ".")
        if key.endswith(".kernel"):
            key = key[: -len("kernel")] + "weight"
            if value.dim() == 3:      # (k², in, out) -> (out, in, k, k)
                k = int(round(value.shape[0] ** 0.5))
                value = value.permute(2, 1, 0).reshape(value.shape[2], value.shape[1], k, k).transpose(3, 2)
            elif value.dim() == 2:    # depthwise (k², C) -> (C, 1, k, k)
                k = int(round(value.shape[0] ** 0.5))
                value = value.permute(1, 0).reshape(-1, 1, k, k).transpose(3, 2)
        elif key.endswith(".bias") and value.dim() == 2 and value.shape[0] == 1:
            value = value.reshape(-1)
        out[key] = value
    return out


def backbone_state_from(path: str | Path, prefix: str = "backbone.") -> tuple[dict[str, Tensor], str]:
    """The backbone weights in ``path`` and the layout they came from ('mimlab' or 'official')."""
    state = read_state_dict(path)
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, "mimlab"
    state = _strip(state, ("module.", "encoder.", "model."))
    if any(re.match(r"blocks\.\d+\.reduction\.weight$", k) for k in state):  # iTPN/HiViT: PatchMerges inside `blocks`
        try:
            from mimlab.checkpoints.itpn import convert_official_itpn
        except ImportError as err:
            raise CheckpointMismatchError(f"{path} is an official iTPN/HiViT checkpoint (PatchMerge inside `blocks`); "
                                          "its import needs mimlab.checkpoints.itpn (the HiViT/iTPN issue)") from err
        state = convert_official_itpn(state)["backbone"]
    state = {k: v for k, v in state.items() if not any(fnmatch.fnmatch(k, p) for p in OFFICIAL_NON_BACKBONE)}
    return remap_minkowski(state), "official"


def load_backbone(
    backbone: nn.Module,
    path: str | Path,
    prefix: str = "backbone.",
    allow_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
) -> dict[str, list[str]]:
    """Load the backbone weights of ``path`` into ``backbone``; return ``{'missing': [...], 'ignored': [...]}``.

    Args:
        allow_missing: fnmatch patterns of backbone keys the checkpoint may lack (fine-tuning-only parameters such as
            ``*relative_position_bias_table``); they keep their initialisation.
        ignore_unexpected: patterns of checkpoint keys to drop silently (e.g. ``norm.*`` when the head replaces it).
    Shapes of ``pos_embed`` / GRN parameters are adapted (2-D sin-cos grid resampling, GRN reshape); any other
    mismatch, unexpected key or missing key raises :class:`CheckpointMismatchError` listing all of them.
    """
    state, layout = backbone_state_from(path, prefix)
    if not state:
        raise CheckpointMismatchError(f"no backbone keys in {path} (looked for {prefix!r}-prefixed mimlab keys and official layouts)")
    own = backbone.state_dict()
    ignored = sorted(k for k in state if k not in own and any(fnmatch.fnmatch(k, p) for p in ignore_unexpected))
    state = {k: v for k, v in state.items() if k not in ignored}
    for key, value in list(state.items()):
        if key in own and value.shape != own[key].shape:
            state[key] = _adapt(key, value, own[key])
    missing = sorted(set(own) - set(state))
    bad_missing = [k for k in missing if not any(fnmatch.fnmatch(k, p) for p in allow_missing)]
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]
    if bad_missing or unexpected or mismatched:
        lines = [f"checkpoint {path} ({layout} layout) does not fit {type(backbone).__name__}:"]
        for title, items in (("shape mismatches", mismatched), ("missing in checkpoint", bad_missing),
                             ("unexpected in checkpoint", unexpected)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        lines.append("  Check that model/backbone matches the checkpoint (size, patch, img_size), or list fine-tuning-only keys "
                     "in task.allow_missing / checkpoint-only keys in task.ignore_unexpected.")
        raise CheckpointMismatchError("\n".join(lines))
    backbone.load_state_dict(state, strict=False)
    if missing:
        log.info("%s: %d backbone keys kept their initialisation: %s", path, len(missing), ", ".join(missing[:10]))
    return {"missing": missing, "ignored": ignored}


def _adapt(key: str, value: Tensor, target: Tensor) -> Tensor:
    """Shape fixes that keep the meaning: GRN (1,1,1,C) <-> (C,), and pos-embed grid resampling."""
    if value.numel() == target.numel() and ("grn" in key or key.endswith(("gamma", "beta"))):
        return value.reshape(target.shape)
    if key.endswith("pos_embed") and value.dim() == 3 and target.dim() == 3 and value.shape[-1] == target.shape[-1]:
        from timm.layers import resample_abs_pos_embed

        prefix = 1 if (value.shape[1] ** 0.5) % 1 else 0
        side_new = int(round((target.shape[1] - prefix) ** 0.5))
        if side_new * side_new + prefix == target.shape[1]:
            return resample_abs_pos_embed(value, [side_new, side_new], num_prefix_tokens=prefix)
    return value
