"""Cosine weight-decay schedule (I-JEPA, facebookresearch/ijepa ``src/utils/schedulers.py`` ``CosineWDSchedule``).

Before every training batch, each optimiser param group whose configured weight decay ``wd0`` is non-zero gets
``wd(p) = final + (wd0 − final) · (1 + cos(π p)) / 2`` at training progress ``p = global_step / total_steps``
(I-JEPA: 0.04 → 0.4). Groups without decay (biases, 1-D parameters) keep 0. ``wd0`` is stored in the param group
(``initial_weight_decay``), so it travels with the optimiser state and resumed runs continue the same schedule.
"""

from __future__ import annotations

import math

import lightning as L


def cosine_weight_decay(start: float, final: float, progress: float) -> float:
    """``final + (start − final)·(1 + cos(π p))/2`` for p clamped to [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineWeightDecay(L.Callback):
    """Args: ``final`` weight decay reached at the end of training (I-JEPA: 0.4)."""

    def __init__(self, final: float) -> None:
        self.final = final

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        progress = trainer.global_step / max(int(trainer.estimated_stepping_batches), 1)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                start = group.setdefault("initial_weight_decay", group["weight_decay"])
                if start:
                    group["weight_decay"] = cosine_weight_decay(start, self.final, progress)
