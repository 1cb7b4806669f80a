"""One adapter from any mimlab backbone (+ optional neck) to the multi-scale features of dense heads.

Three compositions, all chosen in config (``model/dense``):

* ViT (single stride-16 map) → ``SimpleFeaturePyramid`` (ViTDet) → s4..s32 (+ pooled s64 for Mask R-CNN);
* ConvNeXt V2 (s4..s32 stages) → ``TorchvisionFPN`` → s4..s32 (+ pooled s64);
* HiViT + iTPN → the **pre-trained** ``ITPNPyramid`` (s4/8/16, 256 ch) → pooled s32 (+ s64). No new FPN: the
  pyramid comes from the pre-training checkpoint (``neck.*`` keys), as in the official iTPN detection code.

The neck may be given as a module (e.g. the iTPN pyramid, whose shape is fixed by pre-training) or as a factory
(Hydra ``_partial_: true``, its class's ``attach``) called with the backbone's :class:`~mimlab.models.parts.Parts`.

``forward(x: (N, 3, H, W)) -> OrderedDict[str, (N, C, H/s, W/s)]`` with keys ``"0".."k"`` for ``out_strides`` and
``"pool"`` for the last extra level when ``pool_name`` is set (torchvision's Mask R-CNN naming). Inputs are padded
bottom/right to a multiple of ``size_divisible`` (or to the fixed ``input_size`` of a backbone with a fixed
position embedding), and outputs are cropped back to ``ceil(H/s)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mimlab.models.backbones.contract import check_backbone
from mimlab.models.parts import Parts, build


class DenseFeatureAdapter(nn.Module):
    """Backbone → neck → extra pooled levels, as an ordered dict of maps.

    Args:
        backbone: a backbone of the backbone contract (``mimlab.models.backbones.contract``: ``forward_features``,
            ``out_channels``, ``out_strides``, ...).
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

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module | Callable[..., nn.Module] | None = None,
        out_strides: Sequence[int] = (4, 8, 16, 32),
        extra_pool: nn.Module | None = None,
        concat_backbone: bool = False,
        pool_name: str | None = None,
        input_size: Sequence[int] | int | None = None,
        size_divisible: int | None = None,
    ):
        super().__init__()
        contract = check_backbone(backbone)
        self.backbone = backbone
        if isinstance(neck, nn.Identity):  # the pre-training default "no neck"
            neck = None
        self.neck: nn.Module | None = build(neck, Parts(contract))
        src = self.neck if self.neck is not None else backbone
        src_channels, src_strides = list(src.out_channels), list(src.out_strides)  # type: ignore[arg-type]
        self.concat_backbone = concat_backbone
        if concat_backbone:
            bb = dict(zip(backbone.out_strides, backbone.out_channels))  # type: ignore[arg-type]
            missing = [s for s in src_strides if s not in bb]
            if missing:
                raise ValueError(
                    f"concat_backbone: the backbone has no map at stride(s) {missing} (it has {list(bb)})."
                )
            src_channels = [c + bb[s] for c, s in zip(src_channels, src_strides)]
        self.out_strides = [int(s) for s in out_strides]
        self.extra_pool = extra_pool if extra_pool is not None else nn.MaxPool2d(1, 2)
        chans = dict(zip(src_strides, src_channels))
        self._select: list[int | None] = []
        self.out_channels: list[int] = []
        for s in self.out_strides:
            if s in chans:
                self._select.append(src_strides.index(s))
                self.out_channels.append(chans[s])
            elif s > max(src_strides) and s & (s - 1) == 0:
                self._select.append(None)  # pooled from the previous output
                self.out_channels.append(self.out_channels[-1] if self.out_channels else chans[max(src_strides)])
            else:
                raise ValueError(
                    f"Cannot produce stride {s} from {type(src).__name__} strides {src_strides}; "
                    f"a single-scale backbone (e.g. ViT) needs a neck such as SimpleFeaturePyramid."
                )
        if any(sel is None for sel in self._select[:1]):
            raise ValueError(
                f"out_strides {self.out_strides} must start at a stride the neck provides ({src_strides})."
            )
        self.pool_name = pool_name
        self.input_size = (
            (input_size, input_size) if isinstance(input_size, int) else (tuple(input_size) if input_size else None)
        )
        self.size_divisible = size_divisible or max(self.out_strides)

    def check_input_size(self, size: int, key: str) -> None:
        """Raise unless ``size`` (the run's input size, ``data.img_size``, given to the task as ``task.<key>``) is a
        multiple of the backbone's largest stride."""
        stride = max(int(s) for s in self.backbone.out_strides)  # type: ignore[union-attr]
        if size % stride:
            lower, upper = size // stride * stride, (size // stride + 1) * stride
            raise ValueError(
                f"input size {size} (data.img_size, given as task.{key}) is not a multiple of "
                f"{type(self.backbone).__name__}'s largest stride {stride} (out_strides "
                f"{list(self.backbone.out_strides)}); set data.img_size={lower or upper} or {upper}."  # type: ignore[arg-type]
            )

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
        feats = self.backbone.forward_features(self._pad(x))  # type: ignore[operator]
        maps = self.neck(feats) if self.neck is not None else list(feats)
        if self.concat_backbone:
            by_stride = dict(zip(self.backbone.out_strides, feats))  # type: ignore[arg-type]
            src_strides = self.neck.out_strides if self.neck is not None else self.backbone.out_strides
            maps = [torch.cat([m, by_stride[s]], dim=1) for m, s in zip(maps, src_strides)]  # type: ignore[arg-type]
        full: list[torch.Tensor] = []  # on the padded grid, so that pooling sees whole windows
        for sel in self._select:
            full.append(maps[sel] if sel is not None else self.extra_pool(full[-1]))
        outs = [y[..., : math.ceil(h / s), : math.ceil(w / s)] for y, s in zip(full, self.out_strides)]
        return OrderedDict(zip(self.names(), outs))

    # ----- loading pre-training checkpoints ----------------------------------------------------------------
    def load_pretrained(self, path: str | Path, load_neck: bool = False) -> dict[str, dict]:
        """Fill the backbone and optionally the neck from a pre-training checkpoint of any layout the one loader reads
        (:func:`mimlab.checkpoints.load_pretrained`: a mimlab ``.ckpt`` with ``backbone.*``/``neck.*`` keys, or an
        official file (docs/checkpoints.md; iTPN's pyramid is the neck; ``path::submodel`` picks one model of a file
        that holds several); position embeddings resampled to the backbone's grid, logged; the backbone's
        ``checkpoint_optional_keys`` / ``checkpoint_unused_keys`` may be absent / are dropped). A missing, unexpected or mis-shaped key raises ``CheckpointMismatchError`` listing
        them; decoder and target keys are ignored. Returns the per-part reports of the loader.
        """
        from mimlab.checkpoints.load import load_pretrained, split_submodel

        file = Path(split_submodel(path)[0])
        if not file.is_file():
            raise FileNotFoundError(
                f"Pre-training checkpoint not found: {file} (set task.pretrained, or run `make pretrain`)."
            )
        if load_neck and self.neck is None:
            raise ValueError(f"load_neck=True but the adapter has no neck to load the neck weights of {path} into.")
        return load_pretrained(path, self.backbone, self.neck if load_neck else None)
