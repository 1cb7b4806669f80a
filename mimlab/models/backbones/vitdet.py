"""ViTDet attention for dense transfer of a plain (MAE) ViT: windowed blocks, a few global blocks, decomposed rel-pos.

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022
(https://github.com/facebookresearch/detectron2/tree/main/projects/ViTDet). Every block attends inside
non-overlapping ``window_size``² windows of the patch grid (the grid is zero-padded to a multiple of the window),
except the ``global_blocks``, which attend over the whole grid (ViT-B: 14×14 windows, global blocks 2, 5, 8, 11).
Every block adds the decomposed relative position bias of MViTv2 (``rel_pos_h``/``rel_pos_w``, one table per axis,
zero-initialised; a table is interpolated when the grid or window differs from the one it was built for).
As in ViTDet the cls token is not used and there is no final norm.

The blocks are timm's ``vision_transformer_sam.Block`` (the ViTDet block SAM's encoder reuses): their parameter names
equal those of the plain ViT blocks, so a plain MAE checkpoint loads as is; its ``rel_pos_*`` tables are absent and keep
their zero init, its ``norm.*`` is unused (``checkpoint_optional_keys`` / ``checkpoint_unused_keys``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from timm.models.vision_transformer_sam import Block as WindowedBlock
from torch import Tensor, nn

from mimlab.masking import MaskSet
from mimlab.models.backbones.contract import check_pool, hidden_blocks
from mimlab.models.backbones.vit import MaskedViT


class ViTDetBackbone(MaskedViT):
    """A :class:`MaskedViT` whose blocks use ViTDet attention; dense features only (no masked pre-training forward).

    Args:
        window_size: side of the attention windows in patches (14 in ViTDet).
        global_blocks: indices of the blocks with global attention (ViT-B 2, 5, 8, 11; ViT-L 5, 11, 17, 23;
            ViT-H 7, 15, 23, 31).
        rel_pos: add the decomposed relative position bias in every block.
        **vit_kwargs: the :class:`MaskedViT` geometry. ``img_size`` sizes the global blocks' rel-pos tables.

    ``forward_features(x (N, 3, H, W)) -> [(N, D, H/p, W/p)]``.
    """

    checkpoint_optional_keys = ("blocks.*.attn.rel_pos_h", "blocks.*.attn.rel_pos_w")
    checkpoint_unused_keys = ("norm.*",)

    def __init__(
        self, window_size: int = 14, global_blocks: Sequence[int] = (2, 5, 8, 11), rel_pos: bool = True, **vit_kwargs
    ) -> None:
        depth = vit_kwargs.get("depth", 12)
        bad = [i for i in global_blocks if not 0 <= int(i) < depth]
        if bad:
            raise ValueError(
                f"global_blocks {list(global_blocks)}: {bad} are not block indices of a depth-{depth} ViT."
            )
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1 (got {window_size}).")
        self.window_size, self.global_blocks, self.rel_pos = int(window_size), {int(i) for i in global_blocks}, rel_pos
        super().__init__(**vit_kwargs)
        self.norm = nn.Identity()
        self.cls_token.requires_grad_(False)  # type: ignore[union-attr]  # kept so that checkpoints load unchanged; ViTDet does not use it

    def _make_block(self, index: int, block: Callable[..., nn.Module], **kwargs) -> nn.Module:
        """Windowed (or, for ``global_blocks``, global) ViTDet block on (N, gh, gw, D) token grids; ``kwargs`` are the
        plain block's (dim, num_heads, mlp_ratio, drop_path, norm_layer), the ``block`` factory is not used."""
        window = 0 if index in self.global_blocks else self.window_size
        return WindowedBlock(
            **kwargs, qkv_bias=True, use_rel_pos=self.rel_pos, window_size=window, input_size=tuple(self.grid)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None):  # type: ignore[override]
        raise NotImplementedError(
            "ViTDetBackbone is for dense transfer (forward_features); pre-train with MaskedViT "
            "(model/backbone=vit_*) and load its checkpoint here."
        )

    feature_pools: tuple[str, ...] = ("avg",)  # the cls token is not used by ViTDet attention
    global_pool = "avg"

    def forward_pooled(self, x: Tensor, pool: str | None = None) -> Tensor:
        """(N, C, H, W) -> (N, embed_dim): the mean of the feature map of :meth:`forward_features`."""
        pool = check_pool(self, pool)
        return self.forward_features(x)[-1].mean(dim=(2, 3))

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """One map (N, D, H/p, W/p) at stride ``patch_size`` from the patch tokens (no cls token, no final norm)."""
        return self.forward_intermediates(x, [-1], mask)

    def forward_intermediates(
        self, x: Tensor, indices: Sequence[int] | str, mask: Tensor | MaskSet | None = None
    ) -> list[Tensor]:
        """The maps (N, D, H/p, W/p) after blocks ``indices`` (ints, negative from the end, or "all"; ascending)."""
        if mask is not None:
            raise ValueError("ViTDetBackbone does not take a mask (windowed attention needs the whole patch grid).")
        keep = hidden_blocks(indices, len(self.blocks))
        tokens, (gh, gw) = self._embed(x)
        y, out = tokens.reshape(tokens.shape[0], gh, gw, tokens.shape[-1]), []
        for i, block in enumerate(self.blocks):
            y = block(y)
            if i in keep:
                out.append(y.permute(0, 3, 1, 2))
        return out
