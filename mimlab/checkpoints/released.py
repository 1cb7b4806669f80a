"""Random-weight files in the layouts of released checkpoints, at any size: the exact key names, tensor ranks and
file structure of each official release (read off the official model definitions, cited per function), for the
loader's tests and the CPU-scale run of ``experiments/compare_released``. No official code: the names are written out.

``python -m mimlab.checkpoints.released OUT_DIR`` writes one tiny file per layout (:data:`TINY`) and prints their paths.

Each function returns the object the release saves with ``torch.save``; sizes follow the official constructors
(``dim``, ``depth``, ``heads`` for the tables, ``patch``, ``img``). Weights are normal(0, 0.02) (LayerNorm weights
around 1), fixed position tables sin-cos, buffers as the official modules compute their shapes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mimlab.models.pos_embed import sincos_2d_pos_embed


class _Random:
    """Seeded tensors: ``w(*shape)`` normal(0, 0.02), ``norm(prefix, dim)`` a LayerNorm's weight (≈1) and bias."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def w(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.generator) * 0.02

    def norm(self, prefix: str, dim: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": 1 + self.w(dim) * 10, f"{prefix}.bias": self.w(dim)}

    def linear(self, prefix: str, out: int, inp: int, bias: bool = True) -> dict[str, Tensor]:
        return {f"{prefix}.weight": self.w(out, inp), **({f"{prefix}.bias": self.w(out)} if bias else {})}


def _vit_block(r: _Random, prefix: str, dim: int, hidden: int) -> dict[str, Tensor]:
    """timm ``Block`` names, shared by MAE, I-JEPA (``Block``), MaskFeat (``MultiScaleBlock`` without pooling) and
    data2vec 2.0 (``AltBlock``): norm1, attn.qkv (with bias), attn.proj, norm2, mlp.fc1, mlp.fc2."""
    return {
        **r.norm(f"{prefix}.norm1", dim),
        **r.linear(f"{prefix}.attn.qkv", 3 * dim, dim),
        **r.linear(f"{prefix}.attn.proj", dim, dim),
        **r.norm(f"{prefix}.norm2", dim),
        **r.linear(f"{prefix}.mlp.fc1", hidden, dim),
        **r.linear(f"{prefix}.mlp.fc2", dim, hidden),
    }


def _patch_embed(r: _Random, prefix: str, dim: int, patch: int) -> dict[str, Tensor]:
    return {f"{prefix}.weight": r.w(dim, 3, patch, patch), f"{prefix}.bias": r.w(dim)}


def _relative_index(window: int, cls: bool) -> Tensor:
    """The int64 ``relative_position_index`` buffer's shape and dtype: (w²(+1), w²(+1)) (values are not read)."""
    side = window * window + int(cls)
    return torch.zeros(side, side, dtype=torch.long)


def mae_vit(dim: int = 64, depth: int = 2, patch: int = 8, img: int = 64, seed: int = 0) -> dict[str, Any]:
    """``mae_pretrain_vit_{base,large,huge}.pth`` (facebookresearch/mae ``models_mae.py``; encoder only, cls token,
    fixed sin-cos ``pos_embed (1,1+L,D)``, final ``norm``)."""
    r, grid = _Random(seed), img // patch
    model = {
        "cls_token": r.w(1, 1, dim),
        "pos_embed": sincos_2d_pos_embed(dim, (grid, grid), cls_token=True).unsqueeze(0),
        **_patch_embed(r, "patch_embed.proj", dim, patch),
    }
    for i in range(depth):
        model |= _vit_block(r, f"blocks.{i}", dim, 4 * dim)
    return {"model": model | r.norm("norm", dim)}


def simmim_vit(
    dim: int = 64, depth: int = 2, heads: int = 2, patch: int = 8, img: int = 64, seed: int = 0
) -> dict[str, Any]:
    """``simmim_pretrain__vit_base__img224__800ep.pth`` (microsoft/SimMIM ``models/simmim.py`` ``SimMIM`` with
    ``VisionTransformerForSimMIM``, BEiT blocks, ``USE_SHARED_RPB``, no absolute pos-embed, ``INIT_VALUES`` 0.1): the
    encoder under ``encoder.`` (qkv without bias + ``q_bias``/``v_bias``, ``gamma_1``/``gamma_2``, one shared
    ``rel_pos_bias`` table ((2g-1)²+3, heads) and its index buffer), the head ``decoder.0`` (Conv2d D -> 16²·3)."""
    r, grid = _Random(seed), img // patch
    enc = {
        "cls_token": r.w(1, 1, dim),
        "mask_token": r.w(1, 1, dim),
        **_patch_embed(r, "patch_embed.proj", dim, patch),
        "rel_pos_bias.relative_position_bias_table": r.w((2 * grid - 1) ** 2 + 3, heads),
        "rel_pos_bias.relative_position_index": _relative_index(grid, cls=True),
    }
    for i in range(depth):
        block = f"blocks.{i}"
        enc |= {f"{block}.gamma_1": 0.1 + r.w(dim), f"{block}.gamma_2": 0.1 + r.w(dim)}
        enc |= r.norm(f"{block}.norm1", dim) | r.linear(f"{block}.attn.qkv", 3 * dim, dim, bias=False)
        enc |= {f"{block}.attn.q_bias": r.w(dim), f"{block}.attn.v_bias": r.w(dim)}
        enc |= r.linear(f"{block}.attn.proj", dim, dim) | r.norm(f"{block}.norm2", dim)
        enc |= r.linear(f"{block}.mlp.fc1", 4 * dim, dim) | r.linear(f"{block}.mlp.fc2", dim, 4 * dim)
    enc |= r.norm("norm", dim)
    decoder = {"decoder.0.weight": r.w(patch * patch * 3, dim, 1, 1), "decoder.0.bias": r.w(patch * patch * 3)}
    return {"model": {**{f"encoder.{k}": v for k, v in enc.items()}, **decoder}, "epoch": 799}


def simmim_swin(
    dim: int = 16,
    depths: tuple[int, ...] = (1, 1, 2, 1),
    heads: tuple[int, ...] = (1, 2, 2, 4),
    window: int = 2,
    patch: int = 4,
    img: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """``simmim_pretrain__swin_base__img192_window6__800ep.pth`` (microsoft/SimMIM ``models/swin_transformer.py``,
    ``SwinTransformerForSimMIM``): under ``encoder.``, ``patch_embed.{proj,norm}``, per stage s
    ``layers.s.blocks.b.{norm1, attn.relative_position_bias_table ((2w-1)², heads), attn.relative_position_index
    (w², w²), attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` + ``attn_mask (windows, w², w²)`` in shifted blocks, the
    patch merging ``layers.s.downsample.{norm (4C), reduction (2C, 4C)}`` at the end of stages 0..2, ``norm``,
    ``mask_token``; the head ``decoder.0`` (Conv2d 8C -> 32²·3). A stage no wider than the window uses its width
    as the window and does not shift (the official ``SwinTransformerBlock``)."""
    r = _Random(seed)
    enc = {
        **_patch_embed(r, "patch_embed.proj", dim, patch),
        **r.norm("patch_embed.norm", dim),
        "mask_token": r.w(1, 1, dim),
    }
    for s, (depth, head) in enumerate(zip(depths, heads)):
        c, res = dim * 2**s, img // patch // 2**s
        w = min(window, res)
        for b in range(depth):
            block = f"layers.{s}.blocks.{b}"
            enc |= r.norm(f"{block}.norm1", c)
            enc[f"{block}.attn.relative_position_bias_table"] = r.w((2 * w - 1) ** 2, head)
            enc[f"{block}.attn.relative_position_index"] = _relative_index(w, cls=False)
            enc |= r.linear(f"{block}.attn.qkv", 3 * c, c) | r.linear(f"{block}.attn.proj", c, c)
            enc |= (
                r.norm(f"{block}.norm2", c)
                | r.linear(f"{block}.mlp.fc1", 4 * c, c)
                | r.linear(f"{block}.mlp.fc2", c, 4 * c)
            )
            if b % 2 == 1 and res > w:
                enc[f"{block}.attn_mask"] = torch.zeros((res // w) ** 2, w * w, w * w)
        if s < len(depths) - 1:
            enc |= r.norm(f"layers.{s}.downsample.norm", 4 * c)
            enc[f"layers.{s}.downsample.reduction.weight"] = r.w(2 * c, 4 * c)
    last = dim * 2 ** (len(depths) - 1)
    enc |= r.norm("norm", last)
    decoder = {"decoder.0.weight": r.w(32 * 32 * 3, last, 1, 1), "decoder.0.bias": r.w(32 * 32 * 3)}
    return {"model": {**{f"encoder.{k}": v for k, v in enc.items()}, **decoder}, "epoch": 799}


def maskfeat_vit(dim: int = 64, depth: int = 2, patch: int = 16, img: int = 64, seed: int = 0) -> dict[str, Any]:
    """``in1k_VIT_B_MaskFeat_PT_epoch_01600.pyth`` (facebookresearch/SlowFast ``utils/checkpoint.py``
    ``save_checkpoint``; ``models/masked.py`` ``MaskMViT`` of ``configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml``):
    ``model_state`` with cls token, learned ``pos_embed (1,1+L,D)``, ``patch_embed.proj``, timm-named blocks,
    ``mask_token``, no final norm; the head ``pred_head.transforms.0.0`` (LayerNorm) + ``pred_head.projections.0``
    (Linear D -> 9 bins · (p/8)² cells · 3 channels) and the HOG filters ``hogs.0.weight_{x,y} (3,1,3,3)``."""
    r, grid = _Random(seed), img // patch
    hog = 9 * (patch // 8) ** 2 * 3
    state = {
        "cls_token": r.w(1, 1, dim),
        "pos_embed": r.w(1, 1 + grid * grid, dim),
        **_patch_embed(r, "patch_embed.proj", dim, patch),
        "mask_token": r.w(1, 1, dim),
    }
    for i in range(depth):
        state |= _vit_block(r, f"blocks.{i}", dim, 4 * dim)
    state |= r.norm("pred_head.transforms.0.0", dim) | r.linear("pred_head.projections.0", hog, dim)
    state |= {"hogs.0.weight_x": torch.zeros(3, 1, 3, 3), "hogs.0.weight_y": torch.zeros(3, 1, 3, 3)}
    return {"epoch": 1600, "model_state": state, "optimizer_state": {}, "cfg": "MVIT:\n  PATCH_2D: True\n"}


def _data2vec2_encoder(r: _Random, dim: int, prenet: int, depth: int, patch: int, img: int) -> dict[str, Tensor]:
    image, grid = "modality_encoders.IMAGE.", img // patch
    enc = {
        **_patch_embed(r, image + "local_encoder.proj", dim, patch),
        image + "fixed_positional_encoder.positions": sincos_2d_pos_embed(dim, (grid, grid)).unsqueeze(0),
        image + "extra_tokens": r.w(1, 1, dim),
        **r.norm(image + "context_encoder.norm", dim),
    }
    for i in range(prenet):
        enc |= _vit_block(r, f"{image}context_encoder.blocks.{i}", dim, 4 * dim)
    for i in range(depth - prenet):
        enc |= _vit_block(r, f"blocks.{i}", dim, 4 * dim)
    return enc


def data2vec2_vit(
    dim: int = 64, depth: int = 4, prenet: int = 2, patch: int = 8, img: int = 64, seed: int = 0
) -> dict[str, Any]:
    """``base_imagenet.pt`` (facebookresearch/fairseq ``examples/data2vec/models/data2vec2.py`` ``Data2VecMultiModel``
    of ``config/v2/base_images_only_task.yaml``, saved by ``checkpoint_utils.save_state``): ``model`` holds the image
    encoder ``modality_encoders.IMAGE.{local_encoder.proj, fixed_positional_encoder.positions (1,L,D), extra_tokens
    (1,1,D), context_encoder.norm, context_encoder.blocks.0..P-1}``, the decoder ``modality_encoders.IMAGE.decoder.
    {blocks.i.0 (grouped conv), proj}``, the shared ``blocks.0..depth-P-1`` (post-LN ``AltBlock``) and ``_ema``, the EMA
    teacher's fp32 state (``ema_encoder_only: false``: the same encoder names, no decoder). ``depth`` counts all blocks."""
    r = _Random(seed)
    model: dict[str, Any] = _data2vec2_encoder(r, dim, prenet, depth, patch, img)
    decoder = "modality_encoders.IMAGE.decoder."
    for i in range(2):
        model |= {f"{decoder}blocks.{i}.0.weight": r.w(dim, dim // 16, 3, 3), f"{decoder}blocks.{i}.0.bias": r.w(dim)}
    model |= r.linear(decoder + "proj", dim, dim)
    model["_ema"] = _data2vec2_encoder(_Random(seed + 1), dim, prenet, depth, patch, img)
    cfg = {"model": {"_name": "data2vec_multi", "depth": depth - prenet, "embed_dim": dim}}
    return {"args": None, "cfg": cfg, "model": model, "optimizer_history": [], "extra_state": {"epoch": 75}}


def ijepa_vit(
    dim: int = 64, depth: int = 2, patch: int = 8, img: int = 64, predictor_dim: int = 32, seed: int = 0
) -> dict[str, Any]:
    """``IN1K-vit.h.14-300e.pth.tar`` (facebookresearch/ijepa ``src/train.py`` ``save_dict``, ``src/models/
    vision_transformer.py``): ``encoder``, ``predictor`` and ``target_encoder`` state dicts of DDP modules
    (``module.`` prefix) side by side with the optimiser and run state. The encoders: fixed sin-cos ``pos_embed
    (1,L,D)`` without cls row, ``patch_embed.proj``, timm-named blocks, ``norm``; the predictor: ``predictor_embed``,
    ``mask_token``, ``predictor_pos_embed``, ``predictor_blocks``, ``predictor_norm``, ``predictor_proj``."""
    grid = img // patch

    def encoder(r: _Random) -> dict[str, Tensor]:
        enc = {
            "pos_embed": sincos_2d_pos_embed(dim, (grid, grid)).unsqueeze(0),
            **_patch_embed(r, "patch_embed.proj", dim, patch),
        }
        for i in range(depth):
            enc |= _vit_block(r, f"blocks.{i}", dim, 4 * dim)
        return {f"module.{k}": v for k, v in (enc | r.norm("norm", dim)).items()}

    r = _Random(seed + 2)
    predictor = {
        **r.linear("predictor_embed", predictor_dim, dim),
        "mask_token": r.w(1, 1, predictor_dim),
        "predictor_pos_embed": sincos_2d_pos_embed(predictor_dim, (grid, grid)).unsqueeze(0),
        **_vit_block(r, "predictor_blocks.0", predictor_dim, 4 * predictor_dim),
        **r.norm("predictor_norm", predictor_dim),
        **r.linear("predictor_proj", dim, predictor_dim),
    }
    return {
        "encoder": encoder(_Random(seed)),
        "predictor": {f"module.{k}": v for k, v in predictor.items()},
        "target_encoder": encoder(_Random(seed + 1)),
        "opt": {"state": {}, "param_groups": []},
        "scaler": None,
        "epoch": 300,
        "loss": 0.1,
        "batch_size": 128,
        "world_size": 16,
        "lr": 1e-3,
    }


TINY: dict[str, Any] = {  # file name -> writer, at sizes that run in seconds on a CPU
    "mae_pretrain_vit_tiny.pth": mae_vit,
    "simmim_pretrain__vit_tiny.pth": simmim_vit,
    "simmim_pretrain__swin_tiny.pth": simmim_swin,
    "in1k_VIT_tiny_MaskFeat_PT.pyth": maskfeat_vit,
    "data2vec2_tiny_imagenet.pt": data2vec2_vit,
    "IN1K-vit.tiny-ijepa.pth.tar": ijepa_vit,
}


def write_tiny(out_dir: str | Path) -> list[Path]:
    """One random-weight file per layout of :data:`TINY` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, writer in TINY.items():
        torch.save(writer(), out / name)
        paths.append(out / name)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m mimlab.checkpoints.released OUT_DIR")
    print("\n".join(str(p) for p in write_tiny(sys.argv[1])))
