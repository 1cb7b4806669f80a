"""Layer-wise lr decay (BEiT / MAE fine-tuning) as a pluggable ``OptimizerFactory(param_groups=...)`` callable.

Each backbone parameter gets a *layer id* from a rule (``ViTLayerIds``, ``ConvNeXtLayerIds``, ``HiViTLayerIds``);
everything outside the backbone (pooling norm, classifier head) gets the top id ``num_layers``. The groups are then
built by timm's ``param_groups_layer_decay``, so the lr scale of a parameter with id ``i`` is
``decay ** (num_layers - i)`` (head: 1) and 1-D parameters / ``no_weight_decay()`` names get no weight decay.

For a ViT of depth L (MAE ``util/lr_decay.py``): stem (cls_token, pos_embed, patch_embed) = 0, ``blocks.i`` = i+1,
the rest = L+1, so block i is scaled by ``decay ** (L - i)`` and the stem by ``decay ** (L + 1)``.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from timm.optim import param_groups_layer_decay
from torch import nn


class ViTLayerIds:
    """MAE/BEiT ids: ``cls_token``/``pos_embed``/``patch_embed.*`` -> 0, ``blocks.i.*`` -> i+1, others -> depth+1."""

    stem = ("cls_token", "pos_embed", "patch_embed", "absolute_pos_embed", "mask_token")

    def num_layers(self, backbone: nn.Module) -> int:
        return len(backbone.blocks) + 1

    def __call__(self, name: str, backbone: nn.Module) -> int:
        if name.split(".")[0] in self.stem:
            return 0
        match = re.match(r"blocks\.(\d+)\.", name)
        return int(match.group(1)) + 1 if match else self.num_layers(backbone)


class ConvNeXtLayerIds:
    """ConvNeXt V2 ``optim_factory.py`` ids for the official dense naming (``downsample_layers.k``, ``stages.s.b``).

    ``group=False`` ("single", Atto-Tiny): one id per block, ``num_layers = sum(depths)+1``; ``downsample_layers.k`` ->
    ``sum(depths[:k]) + 1`` (the stem is 1), ``stages.s.b`` -> ``sum(depths[:s]) + b + 1``, rest -> ``sum(depths) + 1``.
    ``group=True`` (B/L): 12 groups of three blocks, ``num_layers = 13``: stem 0, downsample 1/2 -> 2/3, stages 0/1 -> 1/2,
    stage-2 block b -> ``3 + b // 3``, downsample 3 and stage 3 -> 12, rest -> 13. Scales are ``decay ** (num_layers - id)``.
    """

    def __init__(self, group: bool = False) -> None:
        self.group = group

    def num_layers(self, backbone: nn.Module) -> int:
        return 13 if self.group else sum(backbone.depths) + 1

    def __call__(self, name: str, backbone: nn.Module) -> int:
        parts = name.split(".")
        depths = list(backbone.depths)
        if parts[0] == "downsample_layers":
            stage = int(parts[1])
            if not self.group:
                return sum(depths[:stage]) + 1
            return {0: 0, 1: 2, 2: 3}.get(stage, 12)
        if parts[0] == "stages":
            stage, block = int(parts[1]), int(parts[2])
            if not self.group:
                return sum(depths[:stage]) + block + 1
            return {0: 1, 1: 2, 3: 12}.get(stage, 3 + block // 3)
        return self.num_layers(backbone)


class HiViTLayerIds:
    """iTPN ``util/lr_decay.py`` ids for HiViT (``stage4``, ``merge4``, ``stage8``, ``merge8``, ``main_blocks``).

    The official model keeps all blocks in one list with the two PatchMerges occupying indices; only non-merge blocks
    count: ``num_layers = 2*mlp_depth + depth + 1`` (31 for iTPN-B) and a PatchMerge takes the id of the block before it.
    ``patch_embed``/``absolute_pos_embed`` -> 0, everything else (pyramid, fc_norm, head) -> ``num_layers``.
    """

    def num_layers(self, backbone: nn.Module) -> int:
        return len(backbone.stage4) + len(backbone.stage8) + len(backbone.main_blocks) + 1

    def __call__(self, name: str, backbone: nn.Module) -> int:
        parts = name.split(".")
        m4, m8 = len(backbone.stage4), len(backbone.stage8)
        offsets = {"stage4": 0, "stage8": m4, "main_blocks": m4 + m8}
        if parts[0] in ("patch_embed", "absolute_pos_embed", "mask_token"):
            return 0
        if parts[0] in offsets:
            return offsets[parts[0]] + int(parts[1]) + 1
        if parts[0] == "merge4":
            return m4
        if parts[0] == "merge8":
            return m4 + m8
        return self.num_layers(backbone)


class _LayerIdView:
    """Duck-typed model for timm's helper: the task's parameters plus ``group_matcher`` returning the id rule."""

    def __init__(self, module: nn.Module, fn: Callable[[str], int]) -> None:
        self._module, self._fn = module, fn

    def named_parameters(self, *args, **kwargs):
        return self._module.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        return self._fn


class LayerDecay:
    """``param_groups`` callable for :class:`~mimlab.optim.OptimizerFactory`: ``f(module, weight_decay) -> groups``.

    Args:
        layer_decay: decay per layer (MAE ViT-B 0.65, L/H 0.75; ConvNeXt V2-B 0.6 "group"; iTPN-B 0.60).
        layer_ids: the id rule (``ViTLayerIds()``, ``ConvNeXtLayerIds(group=True)``, ``HiViTLayerIds()``).
        reference_layers: iTPN renormalisation ``decay ** (reference_layers / num_layers)`` (13 = a 12-block ViT + 1);
            None keeps ``layer_decay`` as is.
        backbone_attr: the task attribute that holds the backbone (its names are matched without this prefix).
        no_weight_decay: extra fnmatch patterns (full names) without weight decay, e.g. ``*.grn.*`` (ConvNeXt V2 GRN).
    """

    def __init__(
        self,
        layer_decay: float = 0.75,
        layer_ids: Callable[[str, nn.Module], int] | None = None,
        reference_layers: int | None = None,
        backbone_attr: str = "backbone",
        no_weight_decay: Iterable[str] = (),
    ) -> None:
        self.layer_decay = layer_decay
        self.layer_ids = layer_ids if layer_ids is not None else ViTLayerIds()
        self.reference_layers = reference_layers
        self.backbone_attr = backbone_attr
        self.no_weight_decay = tuple(no_weight_decay)

    def effective_decay(self, backbone: nn.Module) -> float:
        if self.reference_layers is None:
            return self.layer_decay
        return self.layer_decay ** (self.reference_layers / self.layer_ids.num_layers(backbone))

    def layer_id(self, module: nn.Module, name: str) -> int:
        """Id of the full parameter name ``name`` of ``module`` (non-backbone parameters: ``num_layers``)."""
        backbone = getattr(module, self.backbone_attr)
        prefix = self.backbone_attr + "."
        if name.startswith(prefix):
            return self.layer_ids(name[len(prefix):], backbone)
        return self.layer_ids.num_layers(backbone)

    def _no_decay_names(self, module: nn.Module) -> set[str]:
        names = {n for n, _ in module.named_parameters() if any(fnmatch.fnmatch(n, p) for p in self.no_weight_decay)}
        for prefix, sub in module.named_modules():
            if sub is not module and hasattr(sub, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in sub.no_weight_decay()}
        return names

    def __call__(self, module: nn.Module, weight_decay: float) -> list[dict]:
        backbone = getattr(module, self.backbone_attr)
        top = self.layer_ids.num_layers(backbone)
        ids = {name: self.layer_id(module, name) for name, _ in module.named_parameters()}
        if top not in ids.values():  # timm takes the largest id present as "scale 1": pin it to num_layers
            raise ValueError(f"no parameter outside the backbone gets the top layer id {top}; add a head before building layer-decay groups")
        missing = sorted(set(range(top + 1)) - set(ids.values()))
        if missing:  # timm renumbers the ids it sees consecutively; a gap would shift every scale below it
            raise ValueError(f"layer ids {missing} have no parameters under {type(self.layer_ids).__name__}; scales would not be exact")
        view = _LayerIdView(module, lambda name: ids[name])
        return param_groups_layer_decay(view, weight_decay, no_weight_decay_list=self._no_decay_names(module),
                                        layer_decay=self.effective_decay(backbone))
