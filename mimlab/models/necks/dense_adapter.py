"""One adapter from any mimlab backbone (+ optional neck) to the multi-scale features of dense heads.

Three compositions, all chosen in config (``model/dense``):

* ViT (single stride-16 map) → ``SimpleFeaturePyramid`` (ViTDet) → s4..s32 (+ pooled s64 for Mask R-CNN);
* ConvNeXt V2 (s4..s32 stages) → ``TorchvisionFPN`` → s4..s32 (+ pooled s64);
* HiViT + iTPN → the **pre-trained** ``ITPNPyramid`` (s4/8/16, 256 ch) → pooled s32 (+ s64). No new FPN: the
  pyramid comes from the pre-training checkpoint (``neck.*`` keys), as in the official iTPN detection code.

The neck may be given as a module (e.g. the iTPN pyramid, whose shape is fixed by pre-training) or as a factory
(Hydra ``_partial_: true``) called with ``in_channels=backbone.out_channels, in_strides=backbone.out_strides``.

``forward(x: (N, 3, H, W)) -> OrderedDict[str, (N, C, H/s, W/s)]`` with keys ``"0".."k"`` for ``out_strides`` and
``"pool"`` for the last extra level when ``pool_name`` is set (torchvision's Mask R-CNN naming). Inputs are padded
bottom/right to a multiple of ``size_divisible`` (or to the fixed ``input_size`` of a backbone with a fixed
position embedding), and outputs are cropped back to ``ceil(H/s)``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_EMBED_PREFIXES = ("cls_token", "pos_embed", "absolute_pos_embed", "patch_embed", "mask_token", "stem",
                   "downsample_layers.0")
_BLOCK_RE = re.compile(r"^(blocks\.\d+|stages\.\d+\.(?:blocks\.)?\d+|layers\.\d+\.blocks\.\d+)\.")


class DenseFeatureAdapter(nn.Module):
    """Backbone → neck → extra pooled levels, as an ordered dict of maps.

    Args:
        backbone: a mimlab backbone (``forward_features(x) -> list``, ``out_channels``, ``out_strides``).
        neck: ``None`` (or ``nn.Identity``), a module mapping the backbone list to a list (with ``out_channels``/``out_strides``),
            or a factory for one (see module docstring).
        out_strides: strides to return; coarser ones than the neck provides are made with ``extra_pool``.
        extra_pool: module applied to the coarsest map to halve its resolution (default ``MaxPool2d(1, 2)``
            as torchvision's ``LastLevelMaxPool``; iTPN uses ``AvgPool2d(2, 2)``, its segmentation ``MaxPool2d(2, 2)``).
        concat_backbone: concatenate each neck output with the backbone map of the same stride (iTPN segmentation).
        pool_name: name of the last output (``"pool"`` for torchvision Mask R-CNN, ``None`` to number it).
        input_size: pad inputs to this fixed (H, W) (backbones with fixed position embeddings).
        size_divisible: pad inputs to a multiple of this (defaults to the largest stride).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | Callable[..., nn.Module] | None = None,
                 out_strides: Sequence[int] = (4, 8, 16, 32), extra_pool: nn.Module | None = None,
                 concat_backbone: bool = False, pool_name: str | None = None,
                 input_size: Sequence[int] | int | None = None, size_divisible: int | None = None):
        super().__init__()
        for attr in ("forward_features", "out_channels", "out_strides"):
            if not hasattr(backbone, attr):
                raise TypeError(f"{type(backbone).__name__} lacks '{attr}': dense transfer needs the backbone contract "
                                f"of CONTRIBUTING.md (forward_features, out_channels, out_strides).")
        self.backbone = backbone
        if isinstance(neck, nn.Identity):  # the pre-training default "no neck"
            neck = None
        if neck is not None and not isinstance(neck, nn.Module):
            neck = neck(in_channels=list(backbone.out_channels), in_strides=list(backbone.out_strides))
        self.neck = neck
        src = neck if neck is not None else backbone
        src_channels, src_strides = list(src.out_channels), list(src.out_strides)
        self.concat_backbone = concat_backbone
        if concat_backbone:
            bb = dict(zip(backbone.out_strides, backbone.out_channels))
            missing = [s for s in src_strides if s not in bb]
            if missing:
                raise ValueError(f"concat_backbone: the backbone has no map at stride(s) {missing} (it has {list(bb)}).")
            src_channels = [c + bb[s] for c, s in zip(src_channels, src_strides)]
        self.out_strides = [int(s) for s in out_strides]
        self.extra_pool = extra_pool if extra_pool is not None else nn.MaxPool2d(1, 2)
        chans = dict(zip(src_strides, src_channels))
        self._select, self.out_channels = [], []
        for s in self.out_strides:
            if s in chans:
                self._select.append(src_strides.index(s))
                self.out_channels.append(chans[s])
            elif s > max(src_strides) and s & (s - 1) == 0:
                self._select.append(None)  # pooled from the previous output
                self.out_channels.append(self.out_channels[-1] if self.out_channels else chans[max(src_strides)])
            else:
                raise ValueError(f"Cannot produce stride {s} from {type(src).__name__} strides {src_strides}; "
                                 f"a single-scale backbone (e.g. ViT) needs a neck such as SimpleFeaturePyramid.")
        if any(sel is None for sel in self._select[:1]):
            raise ValueError(f"out_strides {self.out_strides} must start at a stride the neck provides ({src_strides}).")
        self.pool_name = pool_name
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else (tuple(input_size) if input_size else None)
        self.size_divisible = size_divisible or max(self.out_strides)

    def names(self) -> list[str]:
        names = [str(i) for i in range(len(self.out_strides))]
        if self.pool_name:
            names[-1] = self.pool_name
        return names

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.input_size is not None:
            th, tw = self.input_size
            if h > th or w > tw:
                raise ValueError(f"Input {h}x{w} exceeds the backbone's fixed input_size {th}x{tw}; resize smaller.")
        else:
            d = self.size_divisible
            th, tw = math.ceil(h / d) * d, math.ceil(w / d) * d
        return F.pad(x, (0, tw - w, 0, th - h)) if (th, tw) != (h, w) else x

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        feats = self.backbone.forward_features(self._pad(x))
        maps = self.neck(feats) if self.neck is not None else list(feats)
        if self.concat_backbone:
            by_stride = dict(zip(self.backbone.out_strides, feats))
            src_strides = self.neck.out_strides if self.neck is not None else self.backbone.out_strides
            maps = [torch.cat([m, by_stride[s]], dim=1) for m, s in zip(maps, src_strides)]
        full: list[torch.Tensor] = []  # on the padded grid, so that pooling sees whole windows
        for sel in self._select:
            full.append(maps[sel] if sel is not None else self.extra_pool(full[-1]))
        outs = [y[..., : math.ceil(h / s), : math.ceil(w / s)] for y, s in zip(full, self.out_strides)]
        return OrderedDict(zip(self.names(), outs))

    # ----- layer-wise lr decay -------------------------------------------------------------------------------
    def layer_ids(self) -> tuple[dict[str, int], int]:
        """Layer id of every trainable parameter (names relative to this module) and ``num_layers``.

        Uses ``backbone.layer_id(name)`` / ``backbone.num_layers`` when the backbone defines them. Otherwise:
        embeddings → 0; the i-th block (``blocks.i``, ``stages.s.j``) → i+1 in parameter order; other backbone
        params between blocks (PatchMerge, downsampling) take the id of the block before them; params after the
        last block (final norm) and everything outside the backbone (neck, heads) → ``num_layers`` (lr scale 1).
        """
        names = [n for n, p in self.backbone.named_parameters() if p.requires_grad]
        if hasattr(self.backbone, "layer_id") and hasattr(self.backbone, "num_layers"):
            ids = {f"backbone.{n}": int(self.backbone.layer_id(n)) for n in names}
            return ids, int(self.backbone.num_layers)
        block_of, order = {}, {}
        for n in names:
            m = _BLOCK_RE.match(n)
            if m:
                order.setdefault(m.group(1), len(order) + 1)
                block_of[n] = order[m.group(1)]
        num_layers = len(order) + 1
        ids, last, seen_block = {}, 0, 0
        remaining_blocks = sum(1 for n in names if n in block_of)
        for n in names:
            if n in block_of:
                last = block_of[n]
                seen_block += 1
                ids[f"backbone.{n}"] = last
            elif n.startswith(_EMBED_PREFIXES):
                ids[f"backbone.{n}"] = 0
            else:
                ids[f"backbone.{n}"] = last if seen_block < remaining_blocks else num_layers
        return ids, num_layers

    # ----- loading pre-training checkpoints ----------------------------------------------------------------
    def load_pretrained(self, path: str | Path, load_neck: bool = False) -> dict[str, list[str]]:
        """Fill the backbone (``backbone.*`` keys) and optionally the neck (``neck.*``) from a pre-training checkpoint.

        Uses :func:`mimlab.checkpoints.load_pretrained` (strict per prefix: a missing, unexpected or mis-shaped key
        raises ``CheckpointMismatchError`` listing them). Keys under other prefixes (decoder, target) are ignored.
        """
        from mimlab.checkpoints import load_pretrained

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Pre-training checkpoint not found: {path} (set task.pretrained, or run `make pretrain`).")
        report = {"backbone.": load_pretrained(self.backbone, path, prefix="backbone.", strict=True)}
        if load_neck:
            if self.neck is None:
                raise ValueError(f"load_neck=True but the adapter has no neck to load 'neck.*' keys of {path} into.")
            report["neck."] = load_pretrained(self.neck, path, prefix="neck.", strict=True)
        return report
