"""Test-only callback loaded into real DDP runs by tests/test_ddp.py (``+callbacks.probe._target_=tests.ddp_probe.DDPProbe``).

Every rank writes ``<out_dir>/rank<r>.pt`` with: its trainable parameters before the first and after the first optimiser step
and at the end of training, the base lr of the optimiser, the world size, the training sample indices its sampler
handed out (recorded in the main process, so worker processes do not hide them), the training batches it ran, how
many checkpoint writes reached this rank's CheckpointIO and how many metric rows reached this rank's CSV writer, and
the ``static_graph`` / ``gradient_as_bucket_view`` / ``find_unused_parameters`` its DDP wrapper was built with.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter


class DDPProbe(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict = {"checkpoint_writes": 0, "log_writes": 0, "indices": [], "train_batches": 0}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        original = io.save_checkpoint

        def counting_save(*args, **kwargs):
            self.record["checkpoint_writes"] += 1
            return original(*args, **kwargs)

        io.save_checkpoint = counting_save
        writer = _ExperimentWriter.log_metrics

        def counting_log(writer_self, *args, **kwargs):
            self.record["log_writes"] += 1
            return writer(writer_self, *args, **kwargs)

        _ExperimentWriter.log_metrics = counting_log  # this process only
        self._record_sampler(trainer.datamodule)

    def _record_sampler(self, datamodule: L.LightningDataModule) -> None:
        """Make the training loader's sampler append every index it yields to ``record["indices"]``."""
        make, seen = datamodule.train_dataloader, self.record["indices"]

        def recording_loader():
            loader = make()
            base = type(loader.sampler)

            class Recording(base):
                def __iter__(self):
                    for key in base.__iter__(self):
                        seen.append(key[0])
                        yield key

            loader.sampler.__class__ = Recording
            return loader

        datamodule.train_dataloader = recording_loader

    def _params(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The trained parameters (frozen teachers and frozen backbones are left out)."""
        return {k: v.detach().clone() for k, v in pl_module.named_parameters() if v.requires_grad}

    @staticmethod
    def _teacher(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The (frozen, EMA-updated) teacher parameters of an EMA target, ``target.teacher.*``."""
        return {k: v.detach().clone() for k, v in pl_module.named_parameters() if k.startswith("target.teacher.")}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["before"] = self._params(pl_module)
        self.record["teacher_before"] = self._teacher(pl_module)
        self.record["base_lr"] = trainer.optimizers[0].param_groups[0]["initial_lr"]
        self.record["world_size"] = trainer.world_size
        self.record["is_global_zero"] = trainer.is_global_zero
        ddp = trainer.strategy.model  # the DistributedDataParallel wrapper (the module itself in one process)
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            settings = ("static_graph", "gradient_as_bucket_view", "find_unused_parameters")
            self.record["ddp"] = {name: getattr(ddp, name) for name in settings}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["train_batches"] += 1
        if trainer.global_step == 1 and "after_step_1" not in self.record:
            self.record["after_step_1"] = self._params(pl_module)
            self.record["teacher_after_step_1"] = self._teacher(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["final"] = self._params(pl_module)
        self.record["steps"] = trainer.global_step

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")
