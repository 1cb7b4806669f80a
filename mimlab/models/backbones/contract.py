"""The backbone contract: what every task needs from a backbone, declared on the backbone itself.

Modelled on the model-zoo conventions of timm (``feature_info``, ``group_matcher``, ``no_weight_decay``,
``forward_head(pre_logits=True)``) and mmpretrain (``get_layer_depth``). A backbone family (``nn.Module``) provides:

* ``out_channels: list[int]``, ``out_strides: list[int]`` — the maps of ``forward_features``, finest first; the last
  ones are also the width and stride of the masked forward's tokens (what decoders attach to,
  :mod:`mimlab.models.parts`);
* ``in_chans: int`` and ``img_size: int | None`` — the input the backbone is built for (``img_size``: the side its
  fixed position embedding or window grid expects; None where any size works);
* ``forward_features(x (N, C, H, W), mask=None) -> list[(N, out_channels[i], H / out_strides[i], W / out_strides[i])]``
  (``mask`` (N, L) over mask units, 1 = masked; masked positions are zero in the maps);
* ``num_features: int`` and ``feature_pools: tuple[str, ...]``; ``forward_pooled(x, pool=None) -> (N, num_features)``
  for each ``pool`` in ``feature_pools`` ("avg": mean of the last map; "cls": the class token after the final norm);
  ``global_pool``, one of them, is the readout evaluations and exports use unless told otherwise (``pool=None``):
  "avg" for every backbone here (no pre-training loss reaches a ViT's cls output directly);
* ``no_weight_decay() -> set[str]`` — backbone parameter names trained without weight decay (1-D parameters and
  biases never get weight decay anyway);
* ``drop_final_norm() -> tuple[str, ...]`` — for global-pool fine-tuning: replace the final norm by Identity where the
  family's fine-tuning recipe does (MAE's ViT: the pooled tokens go through the head's ``fc_norm`` instead) and return
  the checkpoint key patterns no longer used; ``()`` where the family keeps it (Swin, ConvNeXt V2's head norm, HiViT);
* ``layer_decay_rules: tuple[str, ...]`` and ``layer_decay_rule: str`` (the default) — the official layer-wise lr
  decay rules of the family by name; ``layer_groups(rule=None) -> LayerGroups`` gives every parameter its layer id;
* ``forward(x, mask)`` — the masked forward of pre-training, an :class:`Encoding` for every backbone: the kept tokens
  of one that drops masked units (ViT, HiViT; with the stage ``pyramid`` and the block outputs ``hidden`` asked for
  with ``keep_hidden`` / ``request_hidden``), every position of one that keeps them (mask-token ViT and Swin,
  ConvNeXt V2: :meth:`Encoding.of_map`; decoders read :attr:`Encoding.map`);
* ``forward_intermediates(x, indices, mask=None) -> list[Tensor]`` — timm's way to reach intermediate features: the
  outputs of blocks (ViT, HiViT's main blocks; tokens (N, P+K, D) before the final norm, the tensors of
  ``Encoding.hidden``) or stages (ConvNeXt V2, Swin: the maps of ``forward_features``) ``indices`` (ints, negative
  ones from the end, or "all"), under ``mask`` when one is given;
* ``checkpoint_optional_keys`` / ``checkpoint_unused_keys`` — key patterns a checkpoint may lack (they keep their
  init: a mask token, ViTDet's relative position tables) / that the backbone does not use (ViTDet's final norm);
* ``to_timm(head=None) -> TimmEquivalent | None`` — the timm model that computes exactly what the backbone computes
  (with a fine-tuning head's ``fc_norm.*`` / ``fc.*`` tensors), used by ``mimlab-export``; None where timm builds no
  such model (HiViT, the post-norm ViT of data2vec 2.0): the backbone is then exported as its own state dict and
  config.

:class:`BackboneDefaults` gives the last three their "nothing declared" values (no optional or unused keys, no timm
equivalent) for a family to inherit.

:func:`check_backbone` verifies all of it and returns the backbone typed as :class:`Backbone`; every task calls it
when it is built (composition time, before any data is read), so a backbone that forgets part of the contract fails
there, naming what is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from torch import Tensor, nn

from mimlab.masking import mask_to_token_grid

CONTRACT_METHODS = (
    "forward_features",
    "forward_intermediates",
    "forward_pooled",
    "no_weight_decay",
    "layer_groups",
    "drop_final_norm",
    "to_timm",
)
CONTRACT_ATTRIBUTES = (
    "checkpoint_optional_keys",
    "checkpoint_unused_keys",
    "out_channels",
    "out_strides",
    "in_chans",
    "img_size",
    "num_features",
    "feature_pools",
    "global_pool",
    "layer_decay_rules",
    "layer_decay_rule",
)


@dataclass
class Encoding:
    """What every backbone's masked forward ``forward(x, mask)`` returns.

    tokens: (N, P+K, D) the final tokens: P prefix tokens (the cls token; P = ``num_prefix_tokens``) then the K kept
        units in ascending grid order (K = L where masked units are kept: inpainted by a mask token or zeroed, and for
        every position of a backbone that keeps them all, :meth:`of_map`); N counts mask rows (images x clones).
    mask: (N, L) over the ``grid`` of units, 1 = masked; None without a mask (or, for :meth:`of_map`, where the mask
        units are finer than the final map).
    grid: (gh, gw) the unit grid of the final stage (the final map's positions for :meth:`of_map`).
    ids_keep: (N, K) the grid index of each kept unit; None when nothing was dropped.
    ids_restore: (N, L) the unshuffle indices of ``[kept, dropped]`` order (MAE's), where the backbone states them.
    pyramid: the stage outputs of a hierarchical backbone at the kept units, finest first, in unit layout
        ((N, K, r, r, C), r = units per side at that stage; the last is ``tokens`` (N, K, D)); empty for a plain ViT.
    hidden: block index -> that block's output before the final norm, for the blocks the backbone keeps
        (``keep_hidden``, or asked for by the decoder that reads them: :func:`hidden_blocks`), ascending.
    """

    tokens: Tensor
    mask: Tensor | None
    grid: tuple[int, int]
    ids_keep: Tensor | None = None
    ids_restore: Tensor | None = None
    num_prefix_tokens: int = 0
    pyramid: tuple[Tensor, ...] = ()
    hidden: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def of_map(cls, feature_map: Tensor, mask: Tensor | None) -> Encoding:
        """The encoding of a backbone that keeps every position: its final map (N, D, h, w) as tokens (N, h·w, D) (a
        view), ``mask`` (N, L_units) brought onto the (h, w) grid where the units tile it."""
        grid = (int(feature_map.shape[-2]), int(feature_map.shape[-1]))
        if mask is not None:
            units = mask.shape[1]
            tiles = (grid[0] * grid[1]) % units == 0 and grid[0] * grid[1] >= units
            mask = mask_to_token_grid(mask.to(feature_map.device), grid) if tiles else None
        return cls(feature_map.flatten(2).transpose(1, 2), mask, grid)

    @property
    def map(self) -> Tensor:
        """(N, D, gh, gw) the final tokens of every unit as a map (prefix tokens dropped), for a decoder that reads a
        dense map (SimMIM, MaskFeat, FCMAE); raises where masked units were dropped."""
        if self.tokens.shape[1] - self.num_prefix_tokens != self.grid[0] * self.grid[1]:
            raise ValueError(
                "this decoder reads a map of every position, but the backbone dropped the masked units: use a "
                "backbone that keeps them (MaskTokenViT, MaskTokenSwin, MaskedConvNeXtV2, or drop_masked=false)"
            )
        tokens = self.tokens[:, self.num_prefix_tokens :]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)

    @property
    def restore(self) -> Tensor:
        """``ids_restore`` (N, L), for a decoder that puts the dropped tokens back; raises where there are none."""
        if self.ids_restore is None:
            raise ValueError(
                "this decoder puts dropped tokens back, but the backbone's encoding has no ids_restore: use a "
                "drop-masked backbone (MaskedViT)"
            )
        return self.ids_restore

    @property
    def kept(self) -> Tensor:
        """``ids_keep`` (N, K), the grid index of each kept unit; raises where nothing was dropped."""
        if self.ids_keep is None:
            raise ValueError("this part reads the kept units, but the backbone dropped none (drop_masked=false?)")
        return self.ids_keep


def hidden_blocks(keep: Sequence[int] | str, depth: int, known: Sequence[int] = ()) -> tuple[int, ...]:
    """The block indices (ascending, in ``[0, depth)``) of ``known`` and ``keep`` ("all", or indices; negative ones
    count from the end) whose outputs a token backbone returns in :attr:`Encoding.hidden`. A decoder that reads them
    asks its backbone at build time (``request_hidden``), so no recipe has to list them twice."""
    wanted = range(depth) if keep == "all" else [int(i) for i in keep]
    out = {i + depth if i < 0 else i for i in [*known, *wanted]}
    if any(not 0 <= i < depth for i in out):
        raise ValueError(f"model.backbone.keep_hidden={list(keep)!r} names blocks outside the {depth} blocks")
    return tuple(sorted(out))


def stage_intermediates(stages: list[Tensor], indices: Sequence[int] | str) -> list[Tensor]:
    """``forward_intermediates`` of a stage backbone: the maps of ``stages`` (its ``forward_features``) at ``indices``
    (ints, negative from the end, or "all"), ascending."""
    return [stages[i] for i in hidden_blocks(indices, len(stages))]


class Backbone(Protocol):
    """The backbone contract as a type (what :func:`check_backbone` verifies and returns): the declared widths and
    inputs that parts attach to, and the methods every task calls. A backbone is an ``nn.Module`` that has them."""

    @property
    def out_channels(self) -> Sequence[int]: ...
    @property
    def out_strides(self) -> Sequence[int]: ...
    @property
    def in_chans(self) -> int: ...
    @property
    def img_size(self) -> int | None: ...
    @property
    def num_features(self) -> int: ...
    @property
    def feature_pools(self) -> tuple[str, ...]: ...
    @property
    def global_pool(self) -> str: ...
    @property
    def layer_decay_rules(self) -> tuple[str, ...]: ...
    @property
    def layer_decay_rule(self) -> str: ...

    @property
    def checkpoint_optional_keys(self) -> tuple[str, ...]: ...
    @property
    def checkpoint_unused_keys(self) -> tuple[str, ...]: ...

    def __call__(self, x: Tensor, mask: Any = None) -> Encoding: ...
    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]: ...
    def forward_intermediates(
        self, x: Tensor, indices: Sequence[int] | str, mask: Tensor | None = None
    ) -> list[Tensor]: ...
    def forward_pooled(self, x: Tensor, pool: str | None = None) -> Tensor: ...
    def no_weight_decay(self) -> set[str]: ...
    def drop_final_norm(self) -> tuple[str, ...]: ...
    def layer_groups(self, rule: str | None = None) -> LayerGroups: ...
    def to_timm(self, head: dict[str, Tensor] | None = None) -> TimmEquivalent | None: ...
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...


class BackboneDefaults:
    """The optional declarations of the contract at their "nothing declared" values, for a family to inherit (and
    override what it has): a checkpoint must hold every key and use all of them, and timm builds no equivalent model
    (the export writes the mimlab state dict and config)."""

    checkpoint_optional_keys: tuple[str, ...] = ()
    checkpoint_unused_keys: tuple[str, ...] = ()

    def to_timm(self, head: dict[str, Tensor] | None = None) -> TimmEquivalent | None:
        return None


class BackboneContractError(TypeError):
    """A backbone does not implement the backbone contract; the message names what is missing."""


@dataclass(frozen=True)
class LayerGroups:
    """Layer ids for layer-wise lr decay under one named rule.

    ``ids`` maps every backbone parameter name to an id in ``[0, num_layers]``; parameters outside the backbone
    (necks, heads) get ``num_layers``. The lr scale of id ``i`` under decay ``d`` is
    ``(d ** decay_exponent) ** (num_layers - i)``: ``decay_exponent`` is 1 except for iTPN's renormalisation
    ``13 / num_layers`` (a decay quoted for a 12-block ViT).
    """

    rule: str
    ids: dict[str, int]
    num_layers: int
    decay_exponent: float = 1.0

    @classmethod
    def from_rule(
        cls,
        backbone: nn.Module,
        rule: str,
        layer_id: Callable[[str], int],
        num_layers: int,
        decay_exponent: float = 1.0,
    ) -> LayerGroups:
        """Apply ``layer_id(name)`` to every parameter name of ``backbone``."""
        return cls(
            rule, {name: int(layer_id(name)) for name, _ in backbone.named_parameters()}, num_layers, decay_exponent
        )

    def scale(self, layer_decay: float, layer_id: int) -> float:
        return (layer_decay**self.decay_exponent) ** (self.num_layers - layer_id)


@dataclass
class TimmEquivalent:
    """A timm model that computes what a backbone computes: ``timm.create_model(name, pretrained=False, **kwargs)``
    loads ``state_dict`` with ``strict=True``; its pre-logits (``forward_head(forward_features(x), pre_logits=True)``)
    equal ``reference(x)`` (N, D) of the mimlab module, and its logits the head's when ``kwargs["num_classes"] > 0``."""

    name: str
    kwargs: dict[str, Any]
    state_dict: dict[str, Tensor]
    reference: Callable[[Tensor], Tensor] = field(repr=False)


def resolve_rule(backbone: nn.Module, rule: str | None) -> str:
    """``rule`` (or the backbone's default ``layer_decay_rule``), checked against ``layer_decay_rules``."""
    declared = cast(Backbone, backbone)
    rule = declared.layer_decay_rule if rule is None else rule
    if rule not in declared.layer_decay_rules:
        raise ValueError(
            f"{type(backbone).__name__} has no layer-decay rule {rule!r}; its rules are "
            f"{list(declared.layer_decay_rules)} (set model.backbone.layer_decay_rule)"
        )
    return rule


def check_pool(backbone: nn.Module, pool: str | None) -> str:
    """``pool`` (None: the backbone's ``global_pool``), raising unless it is one of the backbone's ``feature_pools``."""
    declared = cast(Backbone, backbone)
    pool = declared.global_pool if pool is None else pool
    if pool not in declared.feature_pools:
        raise ValueError(
            f"{type(backbone).__name__} has no {pool!r} feature; its pooled features are "
            f"{list(declared.feature_pools)} (set task.features.pool)"
        )
    return pool


def check_backbone(backbone: nn.Module) -> Backbone:
    """``backbone`` as a :class:`Backbone`; raise :class:`BackboneContractError` naming every missing or
    inconsistent part of the contract."""
    name = type(backbone).__name__
    missing = [m for m in CONTRACT_METHODS if not callable(getattr(backbone, m, None))]
    missing += [a for a in CONTRACT_ATTRIBUTES if not hasattr(backbone, a)]
    if missing:
        raise BackboneContractError(
            f"{name} does not implement the backbone contract: missing {', '.join(missing)}. Every backbone family "
            "declares them (CONTRIBUTING.md, 'Adding a backbone family'; mimlab.models.backbones.contract)."
        )
    declared = cast(Backbone, backbone)
    problems = []
    if len(declared.out_channels) != len(declared.out_strides) or not declared.out_strides:
        problems.append(
            f"out_channels {list(declared.out_channels)} and out_strides {list(declared.out_strides)} "
            "must be non-empty lists of the same length"
        )
    unknown_pools = set(declared.feature_pools) - {"avg", "cls"}
    if unknown_pools or not declared.feature_pools:
        problems.append(f"feature_pools {tuple(declared.feature_pools)} must be a non-empty subset of ('avg', 'cls')")
    if declared.global_pool not in declared.feature_pools:
        problems.append(
            f"global_pool {declared.global_pool!r} is not one of feature_pools {tuple(declared.feature_pools)}"
        )
    params = {n for n, _ in declared.named_parameters()}
    for rule in declared.layer_decay_rules:
        groups = declared.layer_groups(rule)
        uncovered = sorted(params - set(groups.ids))
        outside = sorted(n for n, i in groups.ids.items() if not 0 <= i <= groups.num_layers)
        if uncovered:
            problems.append(f"layer_groups({rule!r}) gives no layer id to {uncovered[:5]}")
        if outside:
            problems.append(f"layer_groups({rule!r}) gives ids outside [0, {groups.num_layers}] to {outside[:5]}")
    unknown_nwd = sorted(set(declared.no_weight_decay()) - params)
    if unknown_nwd:
        problems.append(f"no_weight_decay() names parameters it does not have: {unknown_nwd[:5]}")
    if declared.layer_decay_rule not in declared.layer_decay_rules:
        problems.append(
            f"layer_decay_rule {declared.layer_decay_rule!r} is not one of {list(declared.layer_decay_rules)}"
        )
    if problems:
        raise BackboneContractError(f"{name} breaks the backbone contract: " + "; ".join(problems))
    return declared
