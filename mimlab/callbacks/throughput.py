"""Training throughput as the run's wall clock sees it: images ÷ seconds, everything the loop does included.

Keys (all devices together; logged on every logging step, ``trainer.log_every_n_steps``):

* ``perf/img_per_s``: images trained since the end of the first optimiser step (compilation and warm-up excluded)
  ÷ wall-clock seconds since then. Data wait, forward/backward, optimiser, callbacks, logging, checkpoint writes and
  validation are all inside the seconds, so after N steps it is exactly what a stopwatch and an image count give.
* ``perf/img_per_s_window``: the same since the previous logging step. Consecutive windows tile the run (each
  second is in exactly one window), so a dip shows where the time went and the windows add up to ``perf/img_per_s``.

Under DDP each rank counts its own images and the figures are that count × ``world_size`` (every rank trains the same
batch size: the DataModules drop the last incomplete batch); divide by the world size for a per-device rate. With
gradient accumulation every micro-batch counts, and a logging step is an optimiser step, as in Lightning's logging.
:meth:`summary` is the sentence ``mimlab-train`` prints at the end.

Why not Lightning's ``ThroughputMonitor`` (which this replaces; its ``train/device/samples_per_sec`` swung from 20 to
1,000 img/s in one CPU run, median 892 against 213 = images ÷ training time): its rate is a rolling window over the
last ``window_size`` (10) batch ends before each logging step. With ``log_every_n_steps`` (10 here, 50 by default) of
about the window's length, the intervals the window spans are chosen by the logging step, not by the run: work that
lands in the first interval after a logging step (the loggers' own writes happen just after the callbacks'
``on_train_batch_end``) or at an epoch start (a fresh DataLoader iterator, worker start-up, the first batch's decode)
falls outside most windows, and on_validation_end moves its clock forward by the validation time, so validation is
never counted. A window that does hold an epoch boundary reads 20, one of prefetched batches reads 1,000: the median
over windows measures the fast stretches between the costs, not the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from mimlab.callbacks.dashboard import logs_after
from mimlab.utils.batch import batch_size as default_batch_size


class WallClockThroughput(L.Callback):
    """Args: ``batch_size_fn`` (images in a batch; default :func:`mimlab.utils.batch.batch_size`), ``clock`` (seconds;
    ``time.perf_counter``, replaceable in tests)."""

    def __init__(
        self, batch_size_fn: Callable[[Any], int] = default_batch_size, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.batch_size_fn = batch_size_fn
        self.clock = clock
        self.world_size = 1
        self.images = 0  # this rank's images since the clock started
        self.seconds = 0.0  # wall-clock seconds since the clock started (as of the last logging step or the end)
        self._t0: float | None = None
        self._start_step = 0
        self._last_step = 0
        self._window_t0 = 0.0
        self._window_images = 0

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":  # the clock must not run ahead of the queued kernels
            torch.cuda.synchronize(pl_module.device)
        return self.clock()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.world_size = trainer.world_size
        self.images, self.seconds, self._t0 = 0, 0.0, None
        self._start_step = self._last_step = trainer.global_step  # a resumed run starts from its checkpoint's step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._t0 is None:  # the clock starts once the first optimiser step is done (compilation, warm-up)
            if step != self._start_step:
                self._t0 = self._window_t0 = self._now(pl_module)
                self._last_step, self._window_images = step, 0
            return
        self.images += self.batch_size_fn(batch)
        stepped, self._last_step = step != self._last_step, step
        if not (stepped and logs_after(trainer, step)):
            return
        now = self._now(pl_module)
        self.seconds = now - self._t0
        window = now - self._window_t0
        metrics = {"perf/img_per_s": self.world_size * self.images / max(self.seconds, 1e-9)}
        metrics["perf/img_per_s_window"] = self.world_size * (self.images - self._window_images) / max(window, 1e-9)
        self._window_t0, self._window_images = now, self.images
        for name, value in metrics.items():  # through Lightning: the same rows as the step's other metrics
            pl_module.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t0 is not None:
            self.seconds = self._now(pl_module) - self._t0

    @property
    def img_per_s(self) -> float | None:
        """Images per second over the whole run (all devices), or None before a timed image."""
        return self.world_size * self.images / self.seconds if self.images and self.seconds > 0 else None

    def summary(self) -> str | None:
        """E.g. ``"1,536 images in 7.2 s of training = 213 img/s (first step excluded; validation, data wait and
        callbacks included)"``, with the per-device rate under DDP; None when nothing was timed."""
        rate = self.img_per_s
        if rate is None:
            return None
        images = self.world_size * self.images
        devices = (
            f" on {self.world_size} devices ({rate / self.world_size:,.0f} per device)" if self.world_size > 1 else ""
        )
        return (
            f"{images:,} images in {self.seconds:,.1f} s of training = {rate:,.0f} img/s{devices} "
            "(wall clock from the end of the first step; data wait, callbacks and validation included)"
        )
