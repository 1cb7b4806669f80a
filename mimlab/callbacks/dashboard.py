"""Training-health metrics for the dashboard: gradient norm, GPU memory, FLOPs per image and MFU.

Keys (logged every ``trainer.log_every_n_steps`` optimiser steps, so they land in wandb and ``csv/metrics.csv``):
``train/grad_norm`` (total L2 norm of all gradients, after AMP unscaling, before clipping),
``perf/gpu_mem_alloc_gb`` / ``perf/gpu_mem_reserved_gb`` (peak since the last log step; CUDA only),
``perf/train_gflops_per_img`` (once), ``perf/mfu`` (model FLOPs utilisation against ``peak_tflops`` per device).
Images per second are :class:`mimlab.callbacks.throughput.WallClockThroughput`'s (``perf/img_per_s``).
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from mimlab.tasks.pretrain import MaskedPretraining
from mimlab.utils.flops import train_flops_per_image


def measure_train_flops(pl_module: MaskedPretraining, images: torch.Tensor) -> float:
    """FLOPs of one pre-training step (forward + backward) on ``images`` (N, C, H, W): the count ``make bench`` uses
    (:func:`mimlab.utils.flops.train_flops_per_image`), through the module's own ``compute_losses``, without
    writing any ``.grad``."""
    was_training = pl_module.training
    pl_module.train()
    try:
        per_image = train_flops_per_image(
            pl_module,
            lambda: pl_module.compute_losses(images)["loss"],
            images.shape[0],
        )
    finally:
        pl_module.train(was_training)
    return per_image * images.shape[0]


def logs_after(trainer: L.Trainer, steps: int) -> bool:
    """Whether Lightning writes ``self.log`` values to the loggers once ``steps`` optimiser steps are done: every
    ``log_every_n_steps`` steps and when the run is stopping (its rule, from public Trainer state)."""
    every = trainer.log_every_n_steps  # type: ignore[attr-defined]
    return every > 0 and (steps % every == 0 or trainer.should_stop)


class TrainingDashboard(L.Callback):
    """Args: ``measure_flops`` (count a pre-training step's FLOPs with ``flops_images`` images at the start of
    training), ``peak_tflops`` (per-device peak for ``perf/mfu``; docs/performance.md uses 790 for a bf16 H100;
    null = no ``perf/mfu``)."""

    def __init__(self, measure_flops: bool = True, flops_images: int = 2, peak_tflops: float | None = None) -> None:
        self.measure_flops = measure_flops
        self.flops_images = flops_images
        self.peak_tflops = peak_tflops
        self.flops_per_image: float | None = None
        self._t0: float | None = None
        self._steps = 0
        self._last_step = -1

    # --------------------------------------------------------------------------------------------- FLOPs
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.measure_flops and isinstance(pl_module, MaskedPretraining):
            dataset = trainer.datamodule.val_set  # type: ignore[attr-defined]
            images = torch.stack([dataset[i][0] for i in range(min(self.flops_images, len(dataset)))])
            self.flops_per_image = measure_train_flops(pl_module, images.to(pl_module.device)) / len(images)
        if self.flops_per_image:
            rank_zero_info(f"TrainingDashboard: {self.flops_per_image / 1e9:.3f} GFLOP per image per training step")
            for logger in trainer.loggers:
                logger.log_metrics({"perf/train_gflops_per_img": self.flops_per_image / 1e9}, step=trainer.global_step)
        self._t0, self._steps, self._last_step = None, 0, -1

    # --------------------------------------------------------------------------------------------- per step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not logs_after(trainer, trainer.global_step + 1):  # the step about to happen is a logging step
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:  # one foreach kernel per dtype/device group, not a norm + a stack per tensor
            norm = torch.nn.utils.get_total_norm(grads).float()
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        if self._t0 is None:  # the first step (compilation, warm-up) is not timed
            self._t0, self._steps = time.perf_counter(), 0
            return
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if not (stepped and logs_after(trainer, trainer.global_step)):  # once per logging step (accumulation)
            return
        metrics: dict[str, float] = {}
        if pl_module.device.type == "cuda":
            metrics["perf/gpu_mem_alloc_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["perf/gpu_mem_reserved_gb"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            torch.cuda.synchronize(pl_module.device)
        if self.flops_per_image and self.peak_tflops and self._steps > 0:
            elapsed = time.perf_counter() - self._t0
            batch_size = batch[0].shape[0] if isinstance(batch, (list, tuple)) else batch.shape[0]
            achieved = self.flops_per_image * batch_size * self._steps / elapsed
            metrics["perf/mfu"] = achieved / (self.peak_tflops * 1e12)
        self._t0, self._steps = time.perf_counter(), 0
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
