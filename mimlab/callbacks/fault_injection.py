"""Fault injection for testing resume and preemption (e.g. on a new cluster): kill the run at a given step."""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L


class KillAtStep(L.Callback):
    """Send ``signal_name`` (SIGKILL: crash, SIGTERM: preemption, SIGINT: Ctrl-C) to this process once ``global_step``
    reaches ``step``; with ``process_group`` to its whole process group (DataLoader workers too), from another process,
    as a terminal or a scheduler does; with ``rank`` only in the process of that global rank (a DDP peer that dies)."""

    def __init__(
        self, step: int, signal_name: str = "SIGKILL", process_group: bool = False, rank: int | None = None
    ) -> None:
        self.step = step
        self.signal = getattr(signal, signal_name)
        self.process_group = process_group
        self.rank = rank
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            if self.process_group:  # sent by another process, as a terminal or a scheduler sends it
                name = signal.Signals(self.signal).name.removeprefix("SIG")
                subprocess.run(["kill", "-s", name, "--", f"-{os.getpgid(0)}"], check=True, start_new_session=True)
            else:
                os.kill(os.getpid(), self.signal)
