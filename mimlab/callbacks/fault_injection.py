"""Fault injection for testing resume and preemption (e.g. on a new cluster): kill the run at a given step."""
from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """Send ``signal_name`` (SIGKILL: crash, SIGTERM: preemption) to this process once ``global_step`` reaches ``step``."""

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step = step
        self.signal = getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), self.signal)
