"""Test-only callback loaded into real SLURM jobs by tests/test_slurm.py (``+callbacks.probe._target_=...``).

Every task of every attempt (``SLURM_RESTART_COUNT``: 0 first, 1 after a requeue) writes
``<out_dir>/attempt<a>_rank<r>.pt`` when training starts: the SLURM variables, the ranks Lightning derived from them,
its cluster environment, the step and parameters training starts from; at the end of fit it adds the final ones.
With ``hold_at_step``, the first attempt stops at that step, writes ``<out_dir>/holding`` and waits (up to
``hold_s``) for SIGTERM, so that a ``scontrol requeue`` from the test lands mid-run at a known step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID", "SLURM_RESTART_COUNT")


class SlurmProbe(L.Callback):
    def __init__(self, out_dir: str, hold_at_step: int | None = None, hold_s: float = 120.0) -> None:
        self.out_dir = Path(out_dir)
        self.hold_at_step = hold_at_step
        self.hold_s = hold_s
        self.attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self.record: dict = {}

    def _save(self, trainer: L.Trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"attempt{self.attempt}_rank{trainer.global_rank}.pt")

    @staticmethod
    def _params(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        environment = trainer.strategy.cluster_environment
        self.record = {
            "env": {k: os.environ.get(k) for k in SLURM_VARS},
            "cluster_environment": type(environment).__name__,
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "main_address": getattr(environment, "main_address", None),
            "start_step": trainer.global_step,
            "start_params": self._params(pl_module),
        }
        self._save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.attempt or trainer.global_step != self.hold_at_step:
            return
        (self.out_dir / "holding").write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.hold_s
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["end_step"] = trainer.global_step
        self.record["params"] = self._params(pl_module)
        self._save(trainer)
