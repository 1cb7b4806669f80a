"""Dense-transfer optimisation: layer-wise lr decay param groups from explicit layer ids (BEiT / MAE rule) and the
detection / segmentation lr schedules.

Param groups: ``scale = decay ** (num_layers - layer_id)``; 1-D params (biases, norms), position embeddings and
relative-position tables get weight decay 0. Each group carries ``lr = base_lr * scale`` and ``lr_scale = scale``.
The schedules are ``LambdaLR`` factors (they multiply each group's own lr), evaluated per optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import nn

NO_DECAY_NAMES = ("pos_embed", "absolute_pos_embed", "cls_token", "mask_token", "relative_position_bias_table")


def layer_decay_param_groups(named_params: Iterable[tuple[str, nn.Parameter]], layer_ids: dict[str, int],
                             num_layers: int, base_lr: float, weight_decay: float, layer_decay: float = 1.0,
                             no_decay_names: Sequence[str] = NO_DECAY_NAMES) -> list[dict]:
    """Group ``named_params`` by (layer id, weight decay). Names absent from ``layer_ids`` get ``num_layers`` (scale 1)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        lid = layer_ids.get(name, num_layers)
        no_wd = p.ndim <= 1 or any(k in name for k in no_decay_names)
        key = (lid, no_wd)
        if key not in groups:
            scale = layer_decay ** (num_layers - lid)
            groups[key] = {"params": [], "lr": base_lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_wd else weight_decay, "layer_id": lid}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def warmup_multistep(total_steps: int, warmup_steps: int = 250, milestones: Sequence[float] = (8 / 12, 11 / 12),
                     gamma: float = 0.1, warmup_ratio: float = 0.001) -> Callable[[int], float]:
    """Linear warmup from ``warmup_ratio`` then ×gamma at each milestone (fractions of ``total_steps``): the Mask R-CNN 1×
    schedule (12 epochs, steps at epochs 8 and 11, 250 warmup iterations from 0.001 in mmdet/Detectron2)."""
    marks = [int(m * total_steps) for m in milestones]

    def factor(step: int) -> float:
        w = warmup_ratio + (1 - warmup_ratio) * step / warmup_steps if step < warmup_steps else 1.0
        return w * gamma ** sum(step >= m for m in marks)
    return factor


def warmup_poly(total_steps: int, warmup_steps: int = 1500, power: float = 1.0, min_ratio: float = 0.0,
                warmup_ratio: float = 1e-6) -> Callable[[int], float]:
    """Linear warmup then polynomial decay to ``min_ratio`` (the UperNet 160k schedule: warmup 1500, power 1.0)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
        t = min(step, total_steps) / max(total_steps, 1)
        return (1 - min_ratio) * (1 - t) ** power + min_ratio
    return factor

