"""The one param-group builder of every task: layer-wise lr decay from the backbone contract, weight-decay split.

Used as ``OptimizerFactory(param_groups=ParamGroups(...))`` by pre-training, fine-tuning, linear probing, detection
and segmentation; the options in ``conf/optim/`` only change its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from mimlab.models.backbones.contract import LayerGroups


def backbone_prefix(module: nn.Module) -> str:
    """Parameter-name prefix of ``module.backbone`` inside ``module`` (e.g. ``"model.backbone.adapter.backbone."``)."""
    backbone = getattr(module, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(
            f"{type(module).__name__} has no `backbone` module; every task exposes its backbone as "
            "`self.backbone` (CONTRIBUTING.md, 'Adding a task')"
        )
    for name, sub in module.named_modules():
        if sub is backbone:
            return f"{name}." if name else ""
    raise ValueError(f"{type(module).__name__}.backbone is not registered inside the task")


class ParamGroups:
    """``f(module, weight_decay) -> list[dict]`` for :class:`~mimlab.optim.OptimizerFactory`.

    Every trainable parameter gets a layer id: the task's backbone (``module.backbone``) names its own ids through
    ``backbone.layer_groups()`` (its default rule, ``model.backbone.layer_decay_rule``); every other parameter
    (neck, head, decoder) gets the top id ``num_layers``. The lr scale is ``LayerGroups.scale(layer_decay, id)``,
    i.e. ``decay ** (num_layers - id)`` (iTPN: with the decay renormalised), 1 for the top id and for
    ``layer_decay = 1``. No weight decay for 1-D parameters and biases (MAE ``add_weight_decay``, timm
    ``param_groups_weight_decay``) and, with ``backbone_no_weight_decay``, for the backbone's ``no_weight_decay()``
    names (the fine-tuning recipes of MAE, ConvNeXt V2 and iTPN; MAE pre-training does not use the list).

    Groups are keyed by (layer id, decay or not) and carry ``lr_scale``, ``weight_decay`` and ``layer_id``;
    ``decay_options`` / ``no_decay_options`` are merged into the two kinds (LARS: ``always_adapt`` true / false,
    since MAE ``util/lars.py`` leaves 1-D parameters out of the trust ratio).

    Written out instead of calling timm's ``param_groups_layer_decay``, which renumbers the ids it sees
    consecutively and so changes the official scales whenever a rule leaves an id empty (ConvNeXt V2 "single"
    has no id 0; "group" on Atto-Tiny depths leaves several empty).
    """

    def __init__(
        self,
        layer_decay: float = 1.0,
        backbone_no_weight_decay: bool = True,
        decay_options: Mapping | None = None,
        no_decay_options: Mapping | None = None,
    ) -> None:
        self.layer_decay = float(layer_decay)
        self.backbone_no_weight_decay = backbone_no_weight_decay
        self.decay_options = dict(decay_options or {})
        self.no_decay_options = dict(no_decay_options or {})

    def layer_ids(self, module: nn.Module) -> tuple[dict[str, int], LayerGroups]:
        """Layer id of every parameter of ``module`` (full names) and the backbone's :class:`LayerGroups`."""
        prefix = backbone_prefix(module)
        groups = module.backbone.layer_groups()  # type: ignore[operator, union-attr]
        ids = {
            name: groups.ids.get(name[len(prefix) :], groups.num_layers)
            if name.startswith(prefix)
            else groups.num_layers
            for name, _ in module.named_parameters()
        }
        return ids, groups

    def __call__(self, module: nn.Module, weight_decay: float) -> list[dict]:
        ids, layers = self.layer_ids(module)
        prefix = backbone_prefix(module)
        skip = {prefix + n for n in module.backbone.no_weight_decay()} if self.backbone_no_weight_decay else set()  # type: ignore[operator, union-attr]
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            layer_id = ids[name] if self.layer_decay != 1.0 else layers.num_layers
            no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
            key = (layer_id, no_decay)
            if key not in groups:
                options = self.no_decay_options if no_decay else self.decay_options
                groups[key] = {
                    "params": [],
                    "lr_scale": layers.scale(self.layer_decay, layer_id),
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "layer_id": layer_id,
                    **options,
                }
            groups[key]["params"].append(param)
        return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]  # per layer: no-decay first (timm)
