"""perf/img_per_s: images ÷ wall-clock seconds since the first step, checked by hand and against a real fit's clock."""

from __future__ import annotations

import csv
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from conftest import TINY_MAE, TINY_MAE_DECODER, compose_config
from mimlab.callbacks.throughput import WallClockThroughput
from mimlab.train import build


class _Module:
    """What the callback uses of a LightningModule: its device and ``log`` (recorded with the trainer's step)."""

    def __init__(self, trainer):
        self.device, self.trainer = torch.device("cpu"), trainer
        self.rows: list[tuple[int, dict]] = []

    def log(self, name, value, **kwargs):
        step = self.trainer.global_step
        if not self.rows or self.rows[-1][0] != step:
            self.rows.append((step, {}))
        self.rows[-1][1][name] = value


def _drive(callback, micro_batches, accumulate, world_size, log_every, seconds_per_batch, batch=4):
    """Feed the hooks as Lightning would: one ``on_train_batch_end`` per micro-batch, the clock advancing a fixed time."""
    now = [100.0]
    callback.clock = lambda: now[0]
    trainer = SimpleNamespace(global_step=0, world_size=world_size, log_every_n_steps=log_every, should_stop=False)
    module = _Module(trainer)
    callback.on_train_start(trainer, module)
    images = torch.zeros(batch, 3, 8, 8)
    for index in range(micro_batches):
        now[0] += seconds_per_batch
        trainer.global_step = (index + 1) // accumulate
        callback.on_train_batch_end(trainer, module, None, (images, None), index)
    now[0] += 0.5  # the end of fitting (final validation, say) is wall time too
    callback.on_train_end(trainer, module)
    return module.rows


@pytest.mark.parametrize("accumulate, world_size", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_rate_is_images_over_wall_seconds_from_the_first_step(accumulate, world_size):
    callback = WallClockThroughput()
    rows = _drive(callback, 12 * accumulate, accumulate, world_size, log_every=3, seconds_per_batch=0.25)
    step_seconds = 0.25 * accumulate
    # logging steps 3, 6, 9, 12; the clock starts after step 1, so step s has (s - 1) timed steps
    assert [step for step, _ in rows] == [3, 6, 9, 12]
    for _, metrics in rows:
        assert metrics["perf/img_per_s"] == pytest.approx(world_size * 4 / 0.25)  # every device's images
        assert metrics["perf/img_per_s_window"] == pytest.approx(world_size * 4 / 0.25)
    assert callback.images == 11 * accumulate * 4  # this rank's micro-batches after the first optimiser step
    assert callback.seconds == pytest.approx(11 * step_seconds + 0.5)
    assert callback.img_per_s == pytest.approx(world_size * callback.images / callback.seconds)
    summary = callback.summary()
    assert f"{world_size * callback.images:,} images in" in summary and "first step" in summary
    assert ("per device" in summary) == (world_size > 1)


def test_windows_tile_the_run_and_a_slow_stretch_shows_in_its_window_only():
    callback = WallClockThroughput()
    now = [0.0]
    callback.clock = lambda: now[0]
    trainer = SimpleNamespace(global_step=0, world_size=1, log_every_n_steps=2, should_stop=False)
    module = _Module(trainer)
    callback.on_train_start(trainer, module)
    for index in range(9):
        now[0] += 1.0 + (3.0 if index == 4 else 0.0)  # step 5 waits 3 s (an epoch start's loader, say)
        trainer.global_step = index + 1
        callback.on_train_batch_end(trainer, module, None, torch.zeros(2, 3, 4, 4), index)
    windows = {step: m["perf/img_per_s_window"] for step, m in module.rows}
    assert windows == pytest.approx({2: 2.0, 4: 2.0, 6: 4 / 5, 8: 2.0})
    last = module.rows[-1][1]["perf/img_per_s"]
    images = [2, 4, 4, 4]  # per window: step 1 is not timed
    assert sum(n / windows[s] for n, s in zip(images, sorted(windows))) == pytest.approx(sum(images) / last)


class _FitClock(L.Callback):
    """The reference: the time the first optimiser step ended, and the micro-batches run (nothing else)."""

    def __init__(self):
        self.first_step_end: float | None = None
        self.train_end: float | None = None
        self.micro_batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.micro_batches += 1
        if self.first_step_end is None and trainer.global_step == 1:
            self.first_step_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.train_end = time.perf_counter()


class _EpochStartWait(L.Callback):
    """What an epoch boundary costs a real run (a fresh loader iterator, worker start-up, validation): a wait."""

    def on_train_epoch_start(self, trainer, pl_module):
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_logged_rate_agrees_with_images_over_the_fits_own_clock(accumulate, tmp_path, synthetic_root):
    """A real fit (3 epochs of 15 batches of 4 with validation, and a 0.2 s wait at each epoch start): the last
    ``perf/img_per_s`` is within 30 % and the summary's rate within 5 % of images ÷ seconds measured from outside, from
    the end of the first step to the end of training. ThroughputMonitor's 10-batch window read several times that on such runs."""
    cfg = compose_config(
        [
            *TINY_MAE,
            *TINY_MAE_DECODER,
            f"data.root={synthetic_root}",
            "data.batch_size=4",
            "~callbacks.progress",
            "~callbacks.reconstruction",
            "~callbacks.knn",
            "~callbacks.dashboard",
            "trainer.max_epochs=3",
            "trainer.log_every_n_steps=5",
            f"trainer.accumulate_grad_batches={accumulate}",
        ],
        tmp_path,
    )
    datamodule, module, trainer = build(cfg)
    clock = _FitClock()
    trainer.callbacks.extend([clock, _EpochStartWait()])
    trainer.fit(module, datamodule=datamodule)
    (throughput,) = [c for c in trainer.callbacks if isinstance(c, WallClockThroughput)]
    timed_images = 4 * (clock.micro_batches - accumulate)  # the first optimiser step is not timed
    assert clock.first_step_end is not None and clock.train_end is not None
    reference = timed_images / (clock.train_end - clock.first_step_end)  # the same stretch, timed from outside
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("perf/img_per_s")]
    logged = [float(r["perf/img_per_s"]) for r in rows]
    assert len(logged) == 45 // accumulate // 5
    assert throughput.images == timed_images
    assert throughput.img_per_s == pytest.approx(reference, rel=0.05)
    assert logged[-1] == pytest.approx(reference, rel=0.3)


def test_progress_bar_reads_its_training_metrics_once_per_logging_step(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.trainer.states import RunningStage

    from mimlab.callbacks.progress import ProgressBar

    reads = []
    monkeypatch.setattr(
        RichProgressBar, "get_metrics", lambda self, trainer, module: reads.append(1) or {"n": len(reads)}
    )
    bar = ProgressBar()
    trainer = SimpleNamespace(
        state=SimpleNamespace(stage=RunningStage.TRAINING), log_every_n_steps=5, global_step=0, should_stop=False
    )
    shown = []
    for step in range(12):
        trainer.global_step = step
        shown.append(bar.get_metrics(trainer, None)["n"])
    assert shown == [1] * 5 + [2] * 5 + [3] * 2  # re-read at steps 0, 5 and 10
    trainer.state.stage = RunningStage.VALIDATING
    assert bar.get_metrics(trainer, None)["n"] == 4  # other stages: every call
