"""Copy the student backbone into an EMA teacher before the first training step (iTPN-EMA / any EMA target).

``MaskedPretraining`` calls ``target.update(backbone, progress)`` only *after* optimiser steps, so without this the very
first batch would be scored against an unsynced teacher. On resume the target's ``synced`` buffer comes back from the
checkpoint and nothing is copied, so resumed runs stay exact.
"""

from __future__ import annotations

import lightning as L

from mimlab.targets.ema_teacher import EMATeacher


class EMATeacherSync(L.Callback):
    """``on_train_start``: ``pl_module.target.sync_(pl_module.backbone)`` if the target has not been synced yet."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module.target, EMATeacher):
            raise TypeError(f"EMATeacherSync needs an EMA-teacher target; got {type(pl_module.target).__name__}")
        pl_module.target.sync_(pl_module.backbone)  # type: ignore[arg-type]
