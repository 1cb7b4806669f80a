"""Copy the student backbone into an EMA teacher before the first training step (iTPN-EMA / any EMA target).

``MaskedPretraining`` calls ``target.update(backbone, progress)`` only *after* optimiser steps, so without this the very
first batch would be scored against an unsynced teacher. On resume the target's ``synced`` buffer comes back from the
checkpoint and nothing is copied, so resumed runs stay exact.
"""

from __future__ import annotations

import lightning as L
from torch import nn

from mimlab.targets.ema_teacher import EMATeacher


class EMATeacherSync(L.Callback):
    """``on_train_start``: ``pl_module.target.sync_(pl_module.backbone)`` if the target has not been synced yet."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target, backbone = pl_module.target, pl_module.backbone
        if not isinstance(target, EMATeacher) or not isinstance(backbone, nn.Module):
            raise TypeError(f"EMATeacherSync needs an EMA-teacher target; got {type(target).__name__}")
        target.sync_(backbone)
