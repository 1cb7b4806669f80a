"""Convert official ConvNeXt-V2 weights (FCMAE pre-trained, fine-tuned, sparse-encoder or timm layout) to the names of
:class:`mimlab.models.backbones.convnextv2.MaskedConvNeXtV2`; :func:`mimlab.checkpoints.load.load_pretrained` loads them.

Accepted layouts (docs/methods.md §3.6), detected per key:

* **official dense** (``convnextv2_*_fcmae.pt``, ``*_ema.pt``): ``downsample_layers.k.*``, ``stages.s.b.{dwconv,
  norm, pwconv1, grn.gamma, grn.beta, pwconv2}``, ``norm.*``/``head.*`` for fine-tuned models. GRN params are
  ``(1, 1, 1, C)``; they are reshaped to our ``(C,)``.
* **sparse FCMAE** (MinkowskiEngine model state): ``encoder.`` prefix, ``.kernel`` conv weights of shape
  ``(k², in, out)`` (depthwise ``(k², C)``), ``.ln.``/``.linear.`` wrappers, biases ``(1, C)``, GRN ``(1, C)``;
  converted the way ConvNeXt-V2 ``remap_checkpoint_keys`` does. FCMAE decoder keys (``proj``, ``mask_token``,
  ``decoder``, ``pred``) are dropped.
* **timm** (``convnextv2_*.fcmae*``): ``stem.*``, ``stages.s.downsample.*``, ``stages.s.blocks.b.{conv_dw, norm,
  mlp.fc1, mlp.grn.weight/bias, mlp.fc2}``, ``head.norm``/``head.fc`` (1x1-conv MLP weights of the small
  ``conv_mlp`` variants are flattened).

The input is a flat state dict (``mimlab.checkpoints.files.read_state_dict`` unwraps files).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

__all__ = ["convert_convnextv2_state_dict"]

_DECODER_ROOTS = ("proj", "pred", "mask_token", "decoder")

_TIMM_RULES = [  # (pattern, replacement), applied in order
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.", r"stages.\1."),
    (r"\.conv_dw\.", ".dwconv."),
    (r"\.mlp\.fc1\.", ".pwconv1."),
    (r"\.mlp\.fc2\.", ".pwconv2."),
    (r"\.mlp\.grn\.weight$", ".grn.gamma"),
    (r"\.mlp\.grn\.bias$", ".grn.beta"),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]


def _sparse_kernel_to_weight(v: torch.Tensor) -> torch.Tensor:
    """Minkowski ``(k², in, out)`` -> ``(out, in, k, k)``; depthwise ``(k², C)`` -> ``(C, 1, k, k)``."""
    ks = math.isqrt(v.shape[0])
    if v.dim() == 3:
        return v.permute(2, 1, 0).reshape(v.shape[2], v.shape[1], ks, ks).transpose(3, 2).contiguous()
    return v.permute(1, 0).reshape(v.shape[1], 1, ks, ks).transpose(3, 2).contiguous()


def convert_convnextv2_state_dict(state_dict: Mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map any supported layout to mimlab names. Returns ``(converted, dropped_keys)``."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        k = key.removeprefix("encoder.")
        if k.split(".")[0] in _DECODER_ROOTS:
            dropped.append(key)
            continue
        if k.endswith(".kernel"):  # sparse conv
            k, value = k[: -len(".kernel")] + ".weight", _sparse_kernel_to_weight(value)
        k = re.sub(r"\.(ln|linear)\.", ".", k)  # MinkowskiLayerNorm.ln / MinkowskiLinear.linear
        for pattern, repl in _TIMM_RULES:
            k = re.sub(pattern, repl, k)
        if k.endswith((".grn.gamma", ".grn.beta")) or (k.endswith(".bias") and value.dim() > 1):
            value = value.reshape(-1)
        if re.search(r"\.pwconv[12]\.weight$", k) and value.dim() == 4:  # timm conv_mlp: 1x1 conv
            value = value.flatten(1)
        out[k] = value
    return out, dropped
