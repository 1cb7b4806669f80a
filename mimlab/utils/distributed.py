"""Exact evaluation across processes: gather per-sample results in rank order (validation blocks are contiguous).

The DataModules give rank ``r`` the contiguous validation block ``[r·n/W, (r+1)·n/W)`` (``EvalSampler``), so
concatenating the ranks' per-sample results in rank order restores the data set order of a 1-process run, and a
metric computed on the concatenation equals the 1-process figure exactly.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``(n_r, ...)`` tensor (``n_r`` may differ) along dim 0, in rank order."""
    if world_size() == 1:
        return tensor
    return torch.cat(gather_all_tensors(tensor.contiguous()))


def gather_list_states(metric: Metric) -> None:
    """Replace each list state of ``metric`` (one entry per sample or image) by every rank's list, in rank order.

    For metrics built with ``sync_on_compute=False`` whose own sync needs equal list lengths on every rank and
    interleaves them (torchmetrics ``MeanAveragePrecision``). Tensors travel through the CPU.
    """
    size = world_size()
    if size == 1:
        return
    for name, value in metric.metric_state.items():
        if isinstance(value, list):
            local = [v.cpu() if isinstance(v, Tensor) else v for v in value]
            parts: list[list | None] = [None] * size
            dist.all_gather_object(parts, local)
            setattr(metric, name, [item for part in parts for item in part])  # type: ignore[union-attr]


def log_global(module: L.LightningModule, name: str, value: Tensor, **kwargs: Any) -> None:
    """``module.log`` of an epoch-level value that is already the same on every rank (computed from every rank's
    metric states): a max reduction over the ranks returns it unchanged, and marks it as synchronised, which Lightning
    otherwise warns about once per metric under DDP."""
    module.log(name, value, sync_dist=True, reduce_fx="max", **kwargs)
