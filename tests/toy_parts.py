"""A backbone and a decoder that are not part of mimlab, for tests/test_new_method_and_backbone.py: what a researcher
writes to add a backbone family and a method (CONTRIBUTING.md's checklists), in a module of their own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mimlab.masking import MaskSet, as_mask_set, upsample_mask
from mimlab.models.backbones.contract import BackboneDefaults, Encoding, LayerGroups, check_pool, stage_intermediates
from mimlab.models.parts import Parts


class ToyConvBackbone(BackboneDefaults, nn.Module):
    """Two strided convolutions: (N, 3, H, W) -> one map (N, width, H/8, W/8). Masked 8-px units are zeroed in the input
    and in the map (mask (N, L) over 8-px units or a ``MaskSet``, 1 = masked). Layer ids: stem 0, body 1. No timm
    equivalent, nothing optional in its checkpoints (``BackboneDefaults``)."""

    feature_pools = ("avg",)
    layer_decay_rules = ("stem_body",)
    layer_decay_rule = "stem_body"

    def __init__(self, width: int = 16, global_pool: str = "avg") -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.body = nn.Conv2d(width, width, 2, stride=2)
        self.out_channels, self.out_strides = [width], [8]
        self.num_features = width
        self.img_size, self.in_chans = None, 3  # any input size, RGB
        self.global_pool = check_pool(self, global_pool)

    def _unit_map(self, mask: Tensor | MaskSet, x: Tensor, factor: int) -> Tensor:
        grid = (x.shape[-2] // 8, x.shape[-1] // 8)
        plain = as_mask_set(mask).mask.to(x.device)
        return upsample_mask(plain, grid, factor).reshape(x.shape[0], 1, grid[0] * factor, grid[1] * factor)

    def forward(self, x: Tensor, mask: Tensor | MaskSet | None = None) -> Encoding:
        """Every position of the map, masked ones zero."""
        return Encoding.of_map(self.forward_features(x, mask)[0], None if mask is None else as_mask_set(mask).mask)

    def forward_features(self, x: Tensor, mask: Tensor | MaskSet | None = None) -> list[Tensor]:
        if mask is not None:
            x = x * (1 - self._unit_map(mask, x, 8))
        out = self.body(torch.relu(self.stem(x)))
        return [out if mask is None else out * (1 - self._unit_map(mask, x, 1))]

    def forward_intermediates(
        self, x: Tensor, indices: Sequence[int] | str, mask: Tensor | None = None
    ) -> list[Tensor]:
        return stage_intermediates(self.forward_features(x, mask), indices)

    def forward_pooled(self, x: Tensor, pool: str | None = None) -> Tensor:
        check_pool(self, pool)
        return self.forward_features(x)[0].mean(dim=(2, 3))

    def drop_final_norm(self) -> tuple[str, ...]:
        """No final norm."""
        return ()

    def no_weight_decay(self) -> set[str]:
        return set()

    def layer_groups(self, rule: str | None = None) -> LayerGroups:
        return LayerGroups.from_rule(self, rule or self.layer_decay_rule, lambda name: int(name.startswith("body")), 2)


class ToyPixelDecoder(nn.Module):
    """A 1x1 convolution from the backbone map (N, C, gh, gw) to each 8-px unit's pixels: (N, gh·gw, 8·8·3)."""

    def __init__(self, in_channels: int, unit_size: int = 8) -> None:
        super().__init__()
        self.pred = nn.Conv2d(in_channels, unit_size * unit_size * 3, 1)

    @classmethod
    def attach(cls, parts: Parts) -> ToyPixelDecoder:
        """Built from the parts it attaches to: the backbone's width, the mask unit (no config reads another's keys)."""
        return cls(in_channels=parts.backbone.out_channels[-1], unit_size=parts.unit_size)

    def forward(self, features: Encoding, mask: Tensor) -> Tensor:
        return self.pred(features.map).flatten(2).transpose(1, 2)
