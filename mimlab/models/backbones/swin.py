"""Swin Transformer (timm) with SimMIM's learnable mask token (github.com/microsoft/SimMIM ``SwinTransformerForSimMIM``).

timm's ``SwinTransformer`` has no absolute position embedding and its patch embedding (conv + LayerNorm) returns an
NHWC token grid, so SimMIM's change is one step: the embeddings of masked patches are replaced by the mask token right
after the patch embedding; the four stages and the final norm are timm's, unchanged.
Mask convention: ``mask[n, l] = 1`` means unit ``l`` is masked; 32-px units are upsampled to the 4-px patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from mimlab.masking import MaskSet, as_mask_set, fill_masked, mask_to_token_grid
from mimlab.models.backbones.contract import (
    BackboneDefaults,
    Encoding,
    LayerGroups,
    TimmEquivalent,
    check_pool,
    resolve_rule,
    stage_intermediates,
)


class MaskTokenSwin(BackboneDefaults, SwinTransformer):
    """timm ``SwinTransformer`` (its keyword arguments; no classifier) plus ``mask_token`` (1, 1, C0).

    Swin-B for SimMIM: ``embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)``, 192 px with ``window_size=6``.
    Backbone contract: ``forward_features(x, mask=None)`` -> four NCHW maps at ``out_strides`` (4, 8, 16, 32) with
    ``out_channels`` (C0, 2C0, 4C0, 8C0), the last one final-normed; ``forward(x, mask)`` -> every position of the last
    map (``Encoding.of_map``);
    pooled feature "avg" (timm's head input, ``num_features = 8C0``); layer-decay rule "simmim" (:meth:`layer_groups`);
    no weight decay on the relative position bias tables and ``mask_token`` (SimMIM). A checkpoint of the plain Swin
    (fine-tuned, timm) may lack ``mask_token``, which then keeps its init (``checkpoint_optional_keys``).
    """

    checkpoint_optional_keys = ("mask_token",)

    feature_pools = ("avg",)
    global_pool = "avg"
    layer_decay_rules = ("simmim",)
    layer_decay_rule = "simmim"

    def __init__(self, **kwargs) -> None:
        super().__init__(num_classes=0, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.out_channels = [info["num_chs"] for info in self.feature_info]
        self.out_strides = [info["reduction"] for info in self.feature_info]
        self.img_size = int(cast(tuple[int, int], self.patch_embed.img_size)[0])  # timm's SwinTransformer sets in_chans

    def drop_final_norm(self) -> tuple[str, ...]:
        """Kept: SimMIM's Swin fine-tuning pools after the final norm (timm's ``norm``)."""
        return ()

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def layer_groups(self, rule: str | None = None) -> LayerGroups:
        """SimMIM ``optimizer.py`` ``get_swin_layer``: ``mask_token``/``patch_embed.*`` -> 0, block j of stage i ->
        ``sum(depths[:i]) + j + 1``, a patch merging -> the id of the block before it, the rest (final norm) ->
        ``sum(depths) + 1``. (SimMIM's Swin keeps the merging at the end of stage i-1, timm at the start of stage i.)"""
        depths = [len(stage.blocks) for stage in self.layers]  # type: ignore[arg-type]
        top = sum(depths) + 1

        def layer_id(name: str) -> int:
            parts = name.split(".")
            if parts[0] in ("mask_token", "patch_embed"):
                return 0
            if parts[0] != "layers":
                return top
            stage = int(parts[1])
            if parts[2] == "downsample":
                return sum(depths[:stage])
            return sum(depths[:stage]) + int(parts[3]) + 1

        return LayerGroups.from_rule(self, resolve_rule(self, rule), layer_id, top)

    def forward_pooled(self, x: Tensor, pool: str | None = None) -> Tensor:
        """(N, 3, H, W) -> (N, 8C0): global average of the final-normed last stage (timm's classifier input)."""
        pool = check_pool(self, pool)
        return self.forward_features(x)[-1].mean(dim=(-2, -1))

    def to_timm(self, head: dict[str, Tensor] | None = None) -> TimmEquivalent:
        """timm's ``SwinTransformer`` with these weights (``mask_token`` dropped; a fine-tuning head's ``fc.*`` as
        ``head.fc.*``, its ``fc_norm`` applied to the pooled feature has no timm slot and is refused)."""
        if head and "fc_norm.weight" in head:
            raise ValueError(
                "timm's Swin has no norm after pooling: a fine-tuning head with fc_norm cannot be exported"
            )
        state = {k: v for k, v in self.state_dict().items() if k != "mask_token"}
        kwargs: dict[str, Any] = dict(
            img_size=self.patch_embed.img_size,
            patch_size=self.patch_embed.patch_size,
            embed_dim=self.embed_dim,
            depths=[len(stage.blocks) for stage in self.layers],  # type: ignore[arg-type]
            num_heads=[stage.blocks[0].attn.num_heads for stage in self.layers],  # type: ignore[index, union-attr]
            window_size=self.layers[0].blocks[0].window_size,  # type: ignore[index, union-attr]
            mlp_ratio=self.layers[0].blocks[0].mlp.fc1.out_features / self.embed_dim,  # type: ignore[index, union-attr]
            num_classes=0,
        )
        if head:
            state |= {"head.fc.weight": head["fc.weight"], "head.fc.bias": head["fc.bias"]}
            kwargs["num_classes"] = int(head["fc.weight"].shape[0])
        return TimmEquivalent("swin_base_patch4_window7_224", kwargs, state, self.forward_pooled)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:  # type: ignore[override]
        tokens = self.patch_embed(x)  # (N, H/4, W/4, C0)
        if mask is not None:
            tokens = fill_masked(tokens, mask_to_token_grid(mask, tuple(tokens.shape[1:3])), self.mask_token)
        maps = []
        for i, stage in enumerate(self.layers):
            tokens = stage(tokens)
            maps.append(self.norm(tokens) if i == len(self.layers) - 1 else tokens)
        return [m.permute(0, 3, 1, 2) for m in maps]

    def forward_intermediates(  # type: ignore[override]
        self, x: Tensor, indices: Sequence[int] | str, mask: Tensor | None = None
    ) -> list[Tensor]:
        """The maps of stages ``indices`` (ints, negative from the end, or "all"; ascending) of :meth:`forward_features`."""
        return stage_intermediates(self.forward_features(x, mask), indices)

    def forward(self, x: Tensor, mask: Tensor | MaskSet | None = None) -> Encoding:  # type: ignore[override]
        """(N, 3, H, W), (N, L_units) 1 = masked (or its ``MaskSet``) -> every position of the last stage
        (``Encoding.map`` (N, 8C0, H/32, W/32))."""
        plain = None if mask is None else as_mask_set(mask).mask
        return Encoding.of_map(self.forward_features(x, plain)[-1], plain)
