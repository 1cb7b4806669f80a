"""iTPN feature pyramid (Tian et al., CVPR'23; docs/methods.md §4.2), pre-trained with the backbone and reused downstream.

With ``F = fpn_dim`` (256) and backbone features ``f4`` (D/4, stride 4), ``f8`` (D/2, stride 8), ``x16`` (D, stride 16):

    P16 = align_dim_16tofpn(x16)                                   # Linear D→F (absent when D == F)
    P8  = block_16to8(split_16to8(x16) + align_dim_16to8(f8))      # split: LN(D) + Linear(D→4F, no bias) + 2×2 shuffle
    P4  = block_8to4 (split_8to4(P8)   + align_dim_8to4(f4))       # align: Linear(C→F, no bias)
    out = fpn_modules[i](P_i)                                      # one C-MLP block per level (index 0 = P16)

Every operation is per token or inside one 2×2 neighbourhood, so the pyramid runs on the unit layout of a masked
HiViT (only visible units exist) and on dense maps alike. Outputs are ordered by stride: ``[P4, P8, P16]``.
Module names follow the official code (``mimlab.checkpoints.itpn`` loads them without renaming).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.hivit import HiViTBlock, init_weights, map_to_units, units_to_map
from mimlab.models.parts import Parts


class PatchSplit(nn.Module):
    """(N, K, s, s, C) -> (N, K, 2s, 2s, F): LN(C), Linear(C→4F, no bias), 2×2 pixel shuffle inside each unit."""

    def __init__(self, dim: int, fpn_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.fpn_dim = fpn_dim
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.reduction = nn.Linear(dim, 4 * fpn_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, k, h, w, _ = x.shape
        x = self.reduction(self.norm(x)).reshape(n, k, h, w, 2, 2, self.fpn_dim)
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(n, k, 2 * h, 2 * w, self.fpn_dim)


class ITPNPyramid(nn.Module):
    """Three-level C-MLP pyramid at ``fpn_dim`` channels, strides 4/8/16.

    Args:
        in_channels: backbone channels at strides (4, 8, 16), e.g. ``[128, 256, 512]`` for iTPN-B; or give
            ``embed_dim`` (the backbone's D) for ``[D/4, D/2, D]``.
        fpn_dim: pyramid width F (256). fpn_depth: C-MLP blocks in ``block_16to8``/``block_8to4``
            (2 for pixel pre-training and segmentation, 1 for CLIP pre-training and detection).
        mlp_ratio: hidden ratio of the pyramid MLP blocks (4).

    ``forward`` accepts either the backbone's masked :class:`Encoding` (unit layout; returns the encoding with
    ``pyramid = (P4 (N,K,4,4,F), P8 (N,K,2,2,F), P16 (N,K,1,1,F))``) or dense maps ``[s4, s8, s16]``
    ``(N, C_i, H/s_i, W/s_i)`` (returns ``[(N, F, H/4, W/4), (N, F, H/8, W/8), (N, F, H/16, W/16)]``).
    """

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> ITPNPyramid:
        """On the backbone's maps at strides 4/8/16 (its ``out_channels``)."""
        return cls(in_channels=list(parts.backbone.out_channels), **settings)

    def __init__(
        self,
        in_channels: list[int] | tuple[int, ...] | None = None,
        fpn_dim: int = 256,
        fpn_depth: int = 2,
        mlp_ratio: float = 4.0,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if (in_channels is None) == (embed_dim is None):
            raise ValueError("ITPNPyramid: give exactly one of in_channels (3 values) or embed_dim (backbone D)")
        c4, c8, c16 = in_channels if in_channels is not None else (embed_dim // 4, embed_dim // 2, embed_dim)  # type: ignore[operator]
        self.out_channels = [fpn_dim] * 3
        self.out_strides = [4, 8, 16]

        def mlp_block() -> HiViTBlock:
            return HiViTBlock(fpn_dim, 0, mlp_ratio, grid=(1, 1))

        self.align_dim_16tofpn = nn.Linear(c16, fpn_dim) if c16 != fpn_dim else None  # type: ignore[arg-type]
        self.align_dim_16to8 = nn.Linear(c8, fpn_dim, bias=False)
        self.split_16to8 = PatchSplit(c16, fpn_dim)  # type: ignore[arg-type]
        self.block_16to8 = nn.Sequential(*[mlp_block() for _ in range(fpn_depth)])
        self.align_dim_8to4 = nn.Linear(c4, fpn_dim, bias=False)
        self.split_8to4 = PatchSplit(fpn_dim, fpn_dim)
        self.block_8to4 = nn.Sequential(*[mlp_block() for _ in range(fpn_depth)])
        self.fpn_modules = nn.ModuleList([mlp_block() for _ in range(3)])  # P16, P8, P4 (official order)
        self.apply(init_weights)

    def forward_units(self, f4: Tensor, f8: Tensor, x16: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unit layout in and out: (N,K,4,4,C4), (N,K,2,2,C8), (N,K,C16) -> (P4, P8, P16) with F channels."""
        x16 = x16[:, :, None, None, :]
        p16 = x16 if self.align_dim_16tofpn is None else self.align_dim_16tofpn(x16)
        p8 = self.block_16to8(self.split_16to8(x16) + self.align_dim_16to8(f8))
        p4 = self.block_8to4(self.split_8to4(p8) + self.align_dim_8to4(f4))
        return self.fpn_modules[2](p4), self.fpn_modules[1](p8), self.fpn_modules[0](p16)

    def forward(self, features: Encoding | list[Tensor] | tuple[Tensor, ...]):
        if not isinstance(features, (list, tuple)):  # pre-training: the masked encoding
            return dataclasses.replace(features, pyramid=self.forward_units(*features.pyramid))
        if len(features) != 3 or any(f.dim() != 4 for f in features):
            raise ValueError(
                "ITPNPyramid expects a masked Encoding with a 3-level pyramid or three dense maps (N, C, H/s, W/s) at "
                "strides 4/8/16"
            )
        s4, s8, s16 = features
        grid = tuple(s16.shape[-2:])
        units = (map_to_units(s4, 4), map_to_units(s8, 2), map_to_units(s16, 1)[:, :, 0, 0, :])
        return [units_to_map(p, grid) for p in self.forward_units(*units)]  # type: ignore[arg-type]
