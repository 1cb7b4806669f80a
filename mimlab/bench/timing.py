"""The timed loops: a plain PyTorch loop, the Lightning Trainer and the data path alone.

Every loop runs ``warmup`` untimed steps (compilation happens there), then ``repeats`` windows of ``steps`` steps, each
window bracketed by a device synchronisation. :func:`summarize` reports the median window (img/s, ms/step) and the
spread of the windows, so a noisy machine shows up as a wide spread instead of a wrong figure.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mimlab.bench.workloads import quiet_step

GIB = 1024**3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


class WindowClock:
    """Marks window boundaries (synchronising the device first); ``seconds`` are the windows' lengths."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[float] = []

    def mark(self) -> None:
        sync(self.device)
        if not self.marks:
            _reset_peak(self.device)
        self.marks.append(time.perf_counter())

    @property
    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def summarize(batch_size: int, steps: int, seconds: list[float], device: torch.device) -> dict[str, Any]:
    """Median img/s and ms/step over the windows, their min/max and relative spread ((max - min) / median)."""
    rates = sorted(batch_size * steps / s for s in seconds)
    median = statistics.median(rates)
    return {
        "img_s": median,
        "ms_step": 1000 * batch_size / median,
        "img_s_min": rates[0],
        "img_s_max": rates[-1],
        "spread": (rates[-1] - rates[0]) / median,
        "windows": len(rates),
        "peak_mem_gib": _peak_gib(device),
    }


def is_boundary(step: int, warmup: int, steps: int, repeats: int) -> bool:
    """True at the first step of each timed window (steps are counted from 0, warm-up included)."""
    return step >= warmup and (step - warmup) % steps == 0 and step < warmup + steps * repeats


def time_plain(
    module: L.LightningModule,
    batches: Iterator,
    steps: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    bf16: bool,
    fused: bool,
    batch_size: int,
    on_batch: Callable[[Any], Any] = lambda b: b,
) -> dict[str, Any]:
    """A plain loop: ``training_step`` under autocast, backward, AdamW step, ``zero_grad(set_to_none=True)``."""
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    clock = WindowClock(device)
    for step in range(warmup + steps * repeats):
        if is_boundary(step, warmup, steps, repeats):
            clock.mark()
        batch = on_batch(next(batches))
        with autocast:
            loss = quiet_step(module, batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    clock.mark()
    return summarize(batch_size, steps, clock.seconds, device)


class _Repeat(Dataset):
    """The same on-device batch ``length`` times (synthetic data with no loader cost)."""

    def __init__(self, batch: tuple[Any, ...], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return self.batch


class _BenchData(L.LightningDataModule):
    def __init__(self, loader: DataLoader, batch_size: int) -> None:
        super().__init__()
        self.loader, self.batch_size = loader, batch_size

    def train_dataloader(self) -> DataLoader:
        return self.loader


class _WindowTimer(L.Callback):
    def __init__(self, warmup: int, steps: int, repeats: int, device: torch.device) -> None:
        self.warmup, self.steps, self.repeats = warmup, steps, repeats
        self.clock = WindowClock(device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if is_boundary(batch_idx, self.warmup, self.steps, self.repeats):
            self.clock.mark()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup + self.steps * self.repeats - 1:
            self.clock.mark()


def time_lightning(
    module: L.LightningModule,
    batch: tuple[Any, ...],
    steps: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    bf16: bool,
) -> dict[str, Any]:
    """``lightning.Trainer(precision=bf16-mixed)`` over on-device batches, ``self.log`` every step as in real runs."""
    timer = _WindowTimer(warmup, steps, repeats, device)
    total = warmup + steps * repeats
    loader = DataLoader(_Repeat(batch, total), batch_size=None, num_workers=0)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if bf16 else "32-true",
        max_steps=total,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=_BenchData(loader, batch[0].shape[0]))
    return summarize(batch[0].shape[0], steps, timer.clock.seconds, device)


def cycle(make: Callable[[], Any]) -> Iterator:
    while True:
        yield from make()


def mover(datamodule: L.LightningDataModule, device: torch.device) -> Callable[[Any], Any]:
    """What Lightning does between the loader and ``training_step``: transfer, then ``on_after_batch_transfer``."""

    def move(batch: Any) -> Any:
        return datamodule.on_after_batch_transfer(datamodule.transfer_batch_to_device(batch, device, 0), 0)

    return move


def time_loader(
    datamodule: L.LightningDataModule, steps: int, warmup: int, repeats: int, device: torch.device, batch_size: int
) -> dict[str, Any]:
    """The real data path alone: decode + augment in the workers, host-to-device copy, ``on_after_batch_transfer``."""
    batches = cycle(datamodule.train_dataloader)
    move = mover(datamodule, device)
    clock = WindowClock(device)
    for step in range(warmup + steps * repeats):
        if is_boundary(step, warmup, steps, repeats):
            clock.mark()
        move(next(batches))
    clock.mark()
    return summarize(batch_size, steps, clock.seconds, device)
