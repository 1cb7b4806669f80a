"""LARS for linear probing (MAE ``util/lars.py`` semantics) on top of timm's maintained ``timm.optim.Lars``.

MAE's rule: for parameters with ``ndim > 1``: ``d = g + wd * p``; ``q = trust * ||p|| / ||d||`` (1 if a norm is 0);
``mu = momentum * mu + q * d``; ``p -= lr * mu``. Parameters with ``ndim <= 1`` get plain momentum SGD without weight decay
or trust scaling. timm's ``Lars`` adapts a group when ``always_adapt`` is set (its ratio uses ``||g|| + wd ||p||`` in the
denominator instead of ``||g + wd p||``: identical for the probe's wd = 0), so the 1-D / >1-D split is done with two groups.
"""
from __future__ import annotations

from torch import nn


def lars_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """``param_groups`` for :class:`~mimlab.optim.OptimizerFactory`: trust-ratio group (ndim > 1) and plain group (ndim <= 1)."""
    params = [p for p in module.parameters() if p.requires_grad]
    adapt = [p for p in params if p.ndim > 1]
    plain = [p for p in params if p.ndim <= 1]
    groups = []
    if adapt:
        groups.append({"params": adapt, "weight_decay": weight_decay, "always_adapt": True})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "always_adapt": False})
    return groups
