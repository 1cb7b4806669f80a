"""Convert official iTPN / HiViT checkpoints (docs/methods.md §4.7) to the names of mimlab's ``HiViT`` + ``ITPNPyramid`` +
heads; :func:`mimlab.checkpoints.load.load_pretrained` loads the backbone and the pyramid.

Official layout (a model ``state_dict`` under ``'model'``, or ``'module'`` / ``'model_ema'`` / ``'state_dict'``,
optionally prefixed ``module.`` / ``encoder.``): one flat ``blocks`` list in which the two ``PatchMerge`` modules
**occupy list indices** (``m`` and ``2m+1`` for ``m`` C-MLP blocks per early stage: 3 and 7 for iTPN-B), then the
pyramid (``align_dim_*``, ``split_*``, ``block_16to8``, ``block_8to4``, ``fpn_modules``) and either the pixel decoder
(``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``) or
the CLIP heads (``decoder_embed``, ``lm_head``, ``lm_cls_head``, ``norm``, ``norm_cls``, ``cls_pt_layers``; there
``mask_token`` belongs to the backbone).

mimlab splits ``blocks`` into ``stage4 / merge4 / stage8 / merge8 / main_blocks``; every other name is kept.
The PatchMerge positions are found from the keys (the only blocks with ``reduction.weight``), so ``mlp_depth`` need
not be given; a checkpoint that does not fit that pattern raises naming the keys it found.
"""

from __future__ import annotations

import re

from torch import Tensor

from mimlab.checkpoints.files import read_state_dict

NECK_PREFIXES = ("align_dim_", "split_", "block_16to8.", "block_8to4.", "fpn_modules.")
PIXEL_DECODER_PREFIXES = ("decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
CLIP_HEAD_PREFIXES = ("decoder_embed.", "lm_head.", "lm_cls_head.", "norm.", "norm_cls.", "cls_pt_layers.")
BACKBONE_PREFIXES = ("patch_embed.", "absolute_pos_embed", "blocks.", "fc_norm.", "head.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _merge_indices(sd: dict[str, Tensor]) -> tuple[int, int]:
    merges = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k)) and m.group(2) == "reduction.weight"})
    if len(merges) != 2 or merges[1] != 2 * merges[0] + 1:
        raise ValueError(
            f"official iTPN layout expects two PatchMerge entries in 'blocks' at indices m and 2m+1; "
            f"found 'blocks.<i>.reduction.weight' at {merges}. Is this an iTPN/HiViT checkpoint?"
        )
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
    """Split an official (flat) state dict into ``{"backbone", "neck", "decoder", "unused"}`` dicts in mimlab names.

    ``decoder`` holds the pixel decoder (``ITPNPixelDecoder``) or the CLIP heads (``ITPNClipHead``), whichever the
    checkpoint has; ``unused`` keeps what matched nothing (e.g. ``relative_position_index`` buffers).
    """
    sd = {k.removeprefix("encoder."): v for k, v in read_state_dict(state_dict).items()}
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
