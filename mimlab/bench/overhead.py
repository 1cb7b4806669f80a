"""``mimlab-bench overhead=true``: what the Lightning Trainer and each of our callbacks cost per step.

A model small enough that host time dominates (``overhead_experiment`` + ``overhead_overrides``: the real
``MaskedPretraining`` module of a tiny recipe) trains on one synthetic batch already on the device, handed out by a
plain iterable, so no data loader is timed. Each configuration runs ``overhead_warmup`` untimed steps, then
``overhead_steps`` timed ones (from one ``on_train_batch_start`` to the one ``overhead_steps`` later: every hook,
``self.log``, the logger, the optimiser and the LR schedule of those steps). Rounds alternate a plain loop with each
configuration (plain, A, plain, B, ...), ``overhead_rounds`` times; a configuration's cost is the median over the
rounds of its ms/step minus the plain loop's just before it, so a drifting (shared, noisy) machine cancels out.

Configurations: the plain loop (the module's own optimiser, parameter groups and LR schedule, ``compute_losses``,
backward, step, ``zero_grad``, scheduler step, the target's update: what ``training_step`` and ``optimizer_step``
compute, without logging); the Trainer with no callbacks and no logger; with the CSV logger real runs write; with the
logger and each callback of ``conf/callbacks/pretrain.yaml`` alone (and ``mimlab-train``'s own: the non-finite guard,
and the resume/metadata callbacks together); and with all of them, as ``mimlab-train`` runs.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from mimlab.bench.timing import sync
from mimlab.bench.workloads import compose_train, loader_batch

PLAIN = "plain loop"
BARE = "Trainer, no callbacks, no logger"
LOGGER = "Trainer + csv logger"


class _Clock(L.Callback):
    """Marks ``on_train_batch_start`` of batch ``warmup`` and of batch ``warmup + steps`` (first in the list)."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.at = device, (warmup, warmup + steps)
        self.marks: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx in self.at:
            sync(self.device)
            self.marks.append(time.perf_counter())


class _Batches:
    """The same batch ``length`` times (an iterable of its own: Lightning reads a list as several loaders)."""

    def __init__(self, batch: tuple[Any, ...], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return itertools.repeat(self.batch, self.length)


class _Data(L.LightningDataModule):
    """The same on-device batch ``length`` times, no loader; ``val_set`` (host images) for the callbacks that draw."""

    def __init__(self, batch: tuple[Any, ...], length: int, img_size: int) -> None:
        super().__init__()
        self.batch, self.length = batch, length
        self.batch_size, self.img_size = batch[0].shape[0], img_size
        self.val_set = [(image, int(label)) for image, label in zip(batch[0].cpu(), batch[1].cpu())]

    def train_dataloader(self) -> _Batches:
        return _Batches(self.batch, self.length)


def _infrastructure(cfg: DictConfig) -> list[L.Callback]:
    from mimlab.callbacks.resume import LogHistory, PreemptionCheckpoint, RNGState
    from mimlab.callbacks.run_metadata import RunMetadata

    return [RunMetadata({}), RNGState(), LogHistory(), PreemptionCheckpoint(f"{cfg.paths.output_dir}/checkpoints")]


def configurations(composed: DictConfig) -> dict[str, tuple[bool, Callable[[], list[L.Callback]]]]:
    """Name -> (with the CSV logger, fresh callbacks); the plain loop is not among them."""
    ours = {name: (lambda n=name: [instantiate(composed.callbacks[n])]) for name in composed.callbacks}
    extra = {
        "guard": lambda: [instantiate(composed.guard)],
        "resume + metadata": lambda: _infrastructure(composed),
    }
    out: dict[str, tuple[bool, Callable[[], list[L.Callback]]]] = {BARE: (False, list), LOGGER: (True, list)}
    out.update({f"+ {name}": (True, make) for name, make in {**ours, **extra}.items()})
    out["+ all (as mimlab-train runs)"] = (
        True,
        lambda: [c for make in (*ours.values(), *extra.values()) for c in make()],
    )
    return out


def time_plain_loop(module: L.LightningModule, data: _Data, warmup: int, steps: int, device: torch.device) -> float:
    """ms/step of the plain loop (see the module docstring)."""
    module.trainer = None  # detached: one process, no self.log
    module.train()
    stub = SimpleNamespace(
        world_size=1, accumulate_grad_batches=1, estimated_stepping_batches=warmup + steps, max_epochs=1
    )
    configured = module.optim(module, stub, data.batch_size)  # type: ignore[operator]
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    marks: list[float] = []
    for index, batch in enumerate(data.train_dataloader()):
        if index in (warmup, warmup + steps):
            sync(device)
            marks.append(time.perf_counter())
        if index == warmup + steps:
            break
        loss = module.compute_losses(batch[0], batch[-1])["loss"]  # type: ignore[operator]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        module.target.update(module.backbone, min((index + 1) / (warmup + steps), 1.0))  # type: ignore[union-attr, operator]
    return 1000 * (marks[1] - marks[0]) / steps


def time_trainer(
    module: L.LightningModule,
    data: _Data,
    warmup: int,
    steps: int,
    device: torch.device,
    with_logger: bool,
    callbacks: list[L.Callback],
    log_every_n_steps: int,
    root: Path,
) -> float:
    """ms/step of ``trainer.fit`` with ``callbacks`` (and the CSV logger when ``with_logger``)."""
    clock = _Clock(device, warmup, steps)
    names = {type(c).__name__ for c in callbacks}
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=warmup + steps + 1,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=log_every_n_steps,
        logger=CSVLogger(str(root), name="csv") if with_logger else False,
        enable_checkpointing=any("Checkpoint" in n for n in names),
        enable_progress_bar=any("Progress" in n for n in names),
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[clock, *callbacks],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    return 1000 * (clock.marks[1] - clock.marks[0]) / steps


def run_overhead(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Alternating rounds over every configuration; per configuration the median ms/step and the median of its
    paired differences from the plain loop (and a callback's own cost: that minus the Trainer + logger row's)."""
    root = Path(tempfile.mkdtemp(prefix="mimlab-overhead-"))
    composed = compose_train(
        [
            f"experiment={cfg.overhead_experiment}",
            f"hardware={'gpu' if device.type == 'cuda' else 'cpu'}",
            "logger=none",
            f"data.batch_size={cfg.overhead_batch}",
            f"paths.output_dir={root}",
            *cfg.overhead_overrides,
        ]
    )
    module = instantiate(composed.task).to(device)
    img = int(composed.data.img_size)
    gen = torch.Generator().manual_seed(0)
    batch = loader_batch(  # with the masks the loader workers would deliver
        module,
        torch.randn(cfg.overhead_batch, 3, img, img, generator=gen).to(device),
        torch.randint(0, 10, (cfg.overhead_batch,), generator=gen).to(device),
    )
    warmup, steps = int(cfg.overhead_warmup), int(cfg.overhead_steps)
    data = _Data(batch, warmup + steps + 1, img)
    configs = configurations(composed)
    times: dict[str, list[float]] = {name: [] for name in [PLAIN, *configs]}
    differences: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(int(cfg.overhead_rounds)):
        for index, (name, (with_logger, make)) in enumerate(configs.items()):
            plain = time_plain_loop(module, data, warmup, steps, device)
            run_root = root / f"r{round_}c{index}"
            ms = time_trainer(
                module, data, warmup, steps, device, with_logger, make(), composed.trainer.log_every_n_steps, run_root
            )
            times[PLAIN].append(plain)
            times[name].append(ms)
            differences[name].append(ms - plain)
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = [{"configuration": PLAIN, "ms_step": medians[PLAIN], "runs": len(times[PLAIN])}]
    for name in configs:
        minus_plain = statistics.median(differences[name])
        row: dict[str, Any] = {
            "configuration": name,
            "ms_step": medians[name],
            "minus_plain": minus_plain,
            "runs": len(times[name]),
        }
        if name.startswith("+ "):  # both differences drift-corrected by their own plain runs
            row["minus_trainer_logger"] = minus_plain - statistics.median(differences[LOGGER])
        rows.append(row)
    return {
        "experiment": cfg.overhead_experiment,
        "overrides": list(cfg.overhead_overrides),
        "batch": int(cfg.overhead_batch),
        "img_size": img,
        "params": sum(p.numel() for p in module.parameters()),
        "warmup": warmup,
        "steps": steps,
        "rounds": int(cfg.overhead_rounds),
        "log_every_n_steps": int(composed.trainer.log_every_n_steps),
        "rows": rows,
        "times": times,
    }


def print_overhead(result: dict[str, Any], device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"Trainer and callback cost per step on {device}: {result['experiment']} ({result['params']:,} parameters, "
            f"batch {result['batch']}, {result['img_size']} px), median of {result['rounds']} alternating rounds of "
            f"{result['steps']} steps, log every {result['log_every_n_steps']}"
        )
    )
    for column in ("configuration", "ms/step median", "minus plain loop", "minus Trainer + csv logger"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for row in result["rows"]:
        table.add_row(
            row["configuration"],
            f"{row['ms_step']:.2f}",
            f"{row['minus_plain']:+.2f}" if "minus_plain" in row else "",
            f"{row['minus_trainer_logger']:+.2f}" if "minus_trainer_logger" in row else "",
        )
    Console(width=170).print(table)
