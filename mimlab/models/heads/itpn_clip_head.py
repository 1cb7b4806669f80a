"""iTPN-CLIP prediction heads (docs/methods.md §4.4): two regressions of the teacher's features at every unit.

Input: the pyramid's masked ``Encoding`` of a backbone run with ``drop_masked=False`` (all ``L`` units present, masked
ones inpainted); ``attach`` asks it to return block ``aux_block``'s output.

1. pyramid branch: ``decoder_embed`` projects P16/P8/P4 sub-tokens to D, D/4, D/16 (concatenated per unit to D),
   the three levels are summed, then ``norm`` (LN) and ``lm_head`` Linear(D → teacher_dim);
2. aux branch: the main-stage output after block ``aux_block`` (official: ``int(0.75·depth)``) goes through
   ``aux_depth`` extra transformer blocks (``cls_pt_layers``), ``norm_cls`` and ``lm_cls_head``.

Returns ``{"pyramid": (N, L, T), "aux": (N, L, T)}``; both are supervised on all units (official default).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.hivit import HiViT, HiViTBlock, init_weights, relative_position_index
from mimlab.models.heads.itpn_pixel_decoder import LevelFusion
from mimlab.models.parts import Parts


class ITPNClipHead(nn.Module):
    """Args: embed_dim (backbone D), fpn_dim (F), teacher_dim (512 for CLIP ViT-B/16), num_heads, aux_block,
    aux_depth (2), img_size/unit_size (RPE grid), rpe (as the backbone), init_values (layer scale)."""

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> ITPNClipHead:
        """Blocks like the HiViT backbone's (width, heads, unit grid, relative position bias, layer scale) on the
        pyramid's width."""
        hivit = parts.require("backbone", HiViT, "ITPNClipHead")
        head = cls(
            embed_dim=hivit.embed_dim,
            fpn_dim=parts.neck_width,
            num_heads=hivit.num_heads,
            img_size=hivit.img_size,
            unit_size=hivit.unit_size,
            rpe=hivit.rpe,
            init_values=hivit.init_values,
            **settings,
        )
        hivit.request_hidden([head.aux_block])  # the aux branch reads that block's output
        return head

    def __init__(
        self,
        embed_dim: int = 512,
        fpn_dim: int = 256,
        teacher_dim: int = 512,
        num_heads: int = 8,
        aux_block: int = 18,
        aux_depth: int = 2,
        mlp_ratio: float = 4.0,
        img_size: int = 224,
        unit_size: int = 16,
        rpe: bool = True,
        init_values: float | None = None,
        drop_path_rate: float = 0.0,
        num_levels: int = 3,
    ) -> None:
        super().__init__()
        self.aux_block = aux_block
        grid = (img_size // unit_size, img_size // unit_size)
        self.embed = LevelFusion(fpn_dim, embed_dim, num_levels)
        self.cls_pt_layers = nn.ModuleList(
            HiViTBlock(
                embed_dim, num_heads, mlp_ratio, grid, rpe=rpe, drop_path=drop_path_rate, init_values=init_values
            )
            for _ in range(aux_depth)
        )
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.norm_cls = nn.LayerNorm(embed_dim, eps=1e-6)
        self.lm_head = nn.Linear(embed_dim, teacher_dim)
        self.lm_cls_head = nn.Linear(embed_dim, teacher_dim)
        self.apply(init_weights)

    def forward(self, enc: Encoding, mask: Tensor | None = None) -> dict[str, Tensor]:
        if enc.ids_keep is not None:
            raise ValueError("ITPNClipHead needs every unit: build the backbone with drop_masked=false")
        if self.aux_block not in enc.hidden:
            raise KeyError(
                f"ITPNClipHead reads main block {self.aux_block}; set model.backbone.keep_hidden=[{self.aux_block}]"
            )
        levels = self.embed(enc.pyramid)
        x = levels[0]
        for lvl in levels[1:]:
            x = x + lvl
        aux = enc.hidden[self.aux_block]
        rpe_index = self.relative_position_index[None]  # type: ignore[index]
        for blk in self.cls_pt_layers:
            aux = blk(aux, rpe_index)
        return {"pyramid": self.lm_head(self.norm(x)), "aux": self.lm_cls_head(self.norm_cls(aux))}
