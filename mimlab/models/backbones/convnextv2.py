"""ConvNeXt V2 backbone that can run **masked-dense** (FCMAE) or dense (fine-tuning / features).

Architecture as ConvNeXt-V2 ``models/convnextv2.py`` (docs/methods.md §3.1): stem Conv2d(k4, s4) + channels-first LN,
three downsamples LN + Conv2d(k2, s2), blocks ``dwconv 7x7 -> LN -> Linear C->4C -> GELU -> GRN -> Linear 4C->C
-> DropPath -> +x`` with no LayerScale; optional head = global average pool -> LN -> Linear.
Module and parameter names follow the official dense layout (``downsample_layers.k.*``, ``stages.s.b.dwconv``,
``pwconv1``, ``grn.gamma``, ``pwconv2``, ``norm``, ``head``) so official checkpoints load by renaming nothing
(see ``mimlab.checkpoints.convnextv2`` for the sparse / timm layouts).

Masked-dense convention (replaces MinkowskiEngine, see docs/methods.md §3.3 and docs/performance.md §5):
``mask`` is ``(N, L)`` over a ``gh x gw`` grid of square mask units (row-major), ``1 = masked``. It is upsampled
to every stage's resolution; masked positions are set to zero after the stem, after every depthwise conv, after
every block and after every downsample, and GRN statistics use visible positions only (per sample). Masked
pixels therefore cannot influence any visible output, which is what a submanifold sparse conv computes.
Mask units must be a multiple of the total stride (32 px) so that each stage's map is an integer upsampling
of the unit grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import Tensor, nn

from mimlab.masking import MaskSet, as_mask_set
from mimlab.models.backbones.contract import (
    BackboneDefaults,
    Encoding,
    LayerGroups,
    TimmEquivalent,
    check_pool,
    resolve_rule,
    stage_intermediates,
)
from mimlab.models.layers.grn import GRN

__all__ = ["ConvNeXtV2Block", "MaskedConvNeXtV2", "mask_to_map"]


def mask_to_map(mask: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Upsample a unit mask ``(N, gh*gw)`` (1 = masked) to a ``(N, 1, h, w)`` map by repetition.

    ``h`` and ``w`` must be integer multiples of ``gh`` and ``gw``.
    """
    (gh, gw), (h, w) = grid, size
    if h % gh or w % gw:
        raise ValueError(
            f"MaskedConvNeXtV2: a feature map of {h}x{w} is not an integer upsampling of the {gh}x{gw} mask grid; "
            "the mask unit (masking.unit_size) must be a multiple of 32 px and divide the image size"
        )
    m = mask.reshape(mask.shape[0], 1, gh, gw)
    return m.repeat_interleave(h // gh, dim=2).repeat_interleave(w // gw, dim=3)


class ConvNeXtV2Block(nn.Module):
    """One ConvNeXt V2 block on ``(N, C, H, W)``; ``8C^2 + 65C`` parameters.

    ``mask``: optional ``(N, 1, H, W)`` float, 1 = masked. Input is expected to be zero at masked positions;
    the output is zero there too.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, grn_masked_pooling: str = "sample") -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim, masked_pooling=grn_masked_pooling)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        if mask is not None:
            x = x * (1.0 - mask)
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        x = self.act(self.pwconv1(self.norm(x)))
        x = self.grn(x, None if mask is None else mask.permute(0, 2, 3, 1))
        x = self.pwconv2(x).permute(0, 3, 1, 2)
        x = shortcut + self.drop_path(x)
        if mask is not None:
            x = x * (1.0 - mask)
        return x


class MaskedConvNeXtV2(BackboneDefaults, nn.Module):
    """ConvNeXt V2 encoder, mask-aware.

    Args:
        depths, dims: blocks and widths of the four stages (sizes in ``conf/model/backbone/convnextv2_*.yaml``).
        in_chans: image channels.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        num_classes: 0 (default) builds no final norm and no head, the FCMAE pre-training layout
            (official FCMAE checkpoints have neither); > 0 adds ``norm`` (LN) and ``head`` (Linear).
        head_init_scale: multiplies the initial head weight and bias (1e-3 in official fine-tuning).
        layer_decay_rule: the default layer-wise lr decay rule, "single" (official default; Atto-Tiny) or "group"
            (Base/Large/Huge), see :meth:`layer_groups`.
        grn_masked_pooling: GRN statistics under a mask, "sample" (default) or "batch" (the official sparse
            encoder's MinkowskiGRN), see :class:`~mimlab.models.layers.grn.GRN`.

    Init: ``trunc_normal_(std=0.02)`` for conv / linear weights, zero biases (official dense ConvNeXt V2).
    Backbone contract: ``out_channels = dims``, ``out_strides = [4, 8, 16, 32]``; pooled feature "avg" (mean of
    the last stage, before the head's norm); no weight decay on GRN ``gamma``/``beta`` (official
    ``optim_factory.py`` skips them by name).
    """

    feature_pools = ("avg",)
    global_pool = "avg"
    layer_decay_rules = ("single", "group")

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
        head_init_scale: float = 1.0,
        layer_decay_rule: str = "single",
        grn_masked_pooling: str = "sample",
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"MaskedConvNeXtV2 needs 4 stages, got depths={list(depths)} dims={list(dims)}")
        self.depths, self.dims = list(depths), list(dims)
        self.img_size, self.in_chans = None, in_chans  # fully convolutional: any input size
        self.out_channels = list(dims)
        self.out_strides = [4, 8, 16, 32]
        self.num_features = dims[-1]
        self.num_classes = num_classes
        self.layer_decay_rule = layer_decay_rule

        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: works under meta
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(
                nn.ModuleList(ConvNeXtV2Block(dims[i], rates[start + j], grn_masked_pooling) for j in range(depth))
            )
        if num_classes > 0:
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head = nn.Linear(dims[-1], num_classes)
        self.apply(self._init_weights)
        if num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------------------------- contract
    def drop_final_norm(self) -> tuple[str, ...]:
        """Kept: ConvNeXt V2's only final norm is its head norm (``num_classes > 0``), which fine-tuning keeps."""
        return ()

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith((".grn.gamma", ".grn.beta"))}

    def layer_groups(self, rule: str | None = None) -> LayerGroups:
        """ConvNeXt-V2 ``optim_factory.py`` layer ids (``main_finetune.py`` scale ``decay ** (num_layers + 1 - id)``).

        "single": one id per block; ``downsample_layers.k`` -> ``sum(depths[:k]) + 1`` (the stem is 1, id 0 is
        empty), ``stages.s.b`` -> ``sum(depths[:s]) + b + 1``, the rest -> ``sum(depths) + 1``.
        "group" (Base/Large/Huge, from BEiT): 12 groups of three blocks; stem 0, ``downsample_layers.1/2`` -> 2/3,
        stages 0/1 -> 1/2, stage-2 block b -> ``3 + b // 3``, ``downsample_layers.3`` and stage 3 -> 12, rest -> 13.
        """
        rule = resolve_rule(self, rule)
        depths = self.depths
        top = 13 if rule == "group" else sum(depths) + 1

        def layer_id(name: str) -> int:
            parts = name.split(".")
            if parts[0] == "downsample_layers":
                stage = int(parts[1])
                return {0: 0, 1: 2, 2: 3}.get(stage, 12) if rule == "group" else sum(depths[:stage]) + 1
            if parts[0] == "stages":
                stage, block = int(parts[1]), int(parts[2])
                if rule == "group":
                    return {0: 1, 1: 2, 3: 12}.get(stage, 3 + block // 3)
                return sum(depths[:stage]) + block + 1
            return top

        return LayerGroups.from_rule(self, rule, layer_id, top)

    def forward_pooled(self, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """(N, C, H, W) -> (N, dims[-1]): global average of the last stage (the official head's input)."""
        pool = check_pool(self, pool)
        return self.forward_features(x)[-1].mean(dim=(-2, -1))

    def to_timm(self, head: dict[str, Tensor] | None = None) -> TimmEquivalent:
        """timm's ConvNeXt V2 with these weights (timm's ``convnext.checkpoint_filter_fn`` maps the official names):
        its own name (``convnextv2_atto`` ... ``_huge``) when one registers exactly this architecture, else
        ``convnextv2_base`` with ``depths``/``dims``. A fine-tuning head (``fc_norm.*``, ``fc.*``) becomes
        ``head.norm``/``head.fc``. timm's head always normalises the pooled feature: an FCMAE encoder, which has no
        final norm, gets ``head.norm`` as the identity affine (weight 1, bias 0, as timm initialises it), so timm's
        pre-logits are ``LayerNorm(mean of the last stage)``, the parameter-free standardisation of this backbone's
        "avg" feature."""
        from timm.models.convnext import checkpoint_filter_fn

        official = {k: v for k, v in self.state_dict().items() if not k.startswith(("norm.", "head."))}
        width = self.dims[-1]
        if head is None and self.num_classes > 0:
            head = {"fc_norm.weight": self.norm.weight, "fc_norm.bias": self.norm.bias}
            head |= {"fc.weight": self.head.weight, "fc.bias": self.head.bias}
        norm = nn.LayerNorm(width, eps=1e-6)
        if head:
            norm.load_state_dict({"weight": head["fc_norm.weight"], "bias": head["fc_norm.bias"]})
            official |= {"head.weight": head["fc.weight"], "head.bias": head["fc.bias"]}
        official |= {"norm.weight": norm.weight.detach(), "norm.bias": norm.bias.detach()}
        plain: dict[str, Any] = dict(num_classes=int(head["fc.weight"].shape[0]) if head else 0)
        for name in timm.list_models("convnextv2_*"):
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **plain)
            try:
                state = checkpoint_filter_fn(official, model)
            except (KeyError, RuntimeError):  # another depth or width
                continue
            own = model.state_dict()
            if own.keys() == state.keys() and all(own[k].shape == v.shape for k, v in state.items()):
                return TimmEquivalent(name, plain, state, lambda x: norm(self.forward_pooled(x)))
        kwargs = dict(depths=self.depths, dims=self.dims, **plain)
        with torch.device("meta"):
            model = timm.create_model("convnextv2_base", pretrained=False, **kwargs)
        state = checkpoint_filter_fn(official, model)
        return TimmEquivalent("convnextv2_base", kwargs, state, lambda x: norm(self.forward_pooled(x)))

    def _mask_grid(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
        """The ``(gh, gw)`` grid of square mask units implied by the image and ``mask`` (N, L)."""
        h, w = x.shape[-2:]
        n_units = mask.shape[1]
        unit = round((h * w / n_units) ** 0.5)
        if unit == 0 or h % unit or w % unit or (h // unit) * (w // unit) != n_units:
            raise ValueError(
                f"MaskedConvNeXtV2: mask has L={n_units} units, which is not a grid of square units over a "
                f"{h}x{w} image; pass the (N, gh*gw) unit mask from mimlab.masking"
            )
        return h // unit, w // unit

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``x`` (N, in_chans, H, W), ``mask`` optional (N, L), 1 = masked.

        Returns the four stage outputs ``(N, dims[i], H / 4·2^i, W / 4·2^i)``; masked positions are zero.
        """
        grid = None if mask is None else self._mask_grid(x, mask)
        feats = []
        for i in range(4):
            x = self.downsample_layers[i](x)
            m = None if mask is None else mask_to_map(mask.to(device=x.device, dtype=x.dtype), grid, x.shape[-2:])  # type: ignore[arg-type]
            if m is not None:
                x = x * (1.0 - m)
            for block in self.stages[i]:  # type: ignore[attr-defined]
                x = block(x, m)
            feats.append(x)
        return feats

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int] | str, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The maps of stages ``indices`` (ints, negative from the end, or "all"; ascending) of :meth:`forward_features`."""
        return stage_intermediates(self.forward_features(x, mask), indices)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | MaskSet | None = None) -> Encoding:
        """Masked encoding for FCMAE: every position of the last stage (``Encoding.map`` (N, dims[-1], H/32, W/32), zero
        at masked positions); ``mask`` (N, L_units), 1 = masked, or its ``MaskSet``."""
        plain = None if mask is None else as_mask_set(mask).mask
        return Encoding.of_map(self.forward_features(x, plain)[-1], plain)

    def forward_head(self, feature: torch.Tensor) -> torch.Tensor:
        """Global average pool -> LN -> Linear on the last stage map ``(N, C, h, w)`` -> ``(N, num_classes)``."""
        if self.num_classes == 0:
            raise RuntimeError("MaskedConvNeXtV2 was built with num_classes=0 (no head); set num_classes > 0")
        return self.head(self.norm(feature.mean(dim=(-2, -1))))
