"""Throughput benchmark: ``python -m mimlab.bench model=mae_vit_b batch=256 steps=15`` (``make bench``).

For each workload of ``conf/bench.yaml`` (a recipe: the real pre-training or fine-tuning task) it reports images/s, ms/step,
peak GPU memory, train FLOPs per image (:mod:`mimlab.utils.flops`, the count the dashboard's ``perf/mfu`` uses) and MFU against ``peak_tflops`` (790 TFLOP/s, the measured H100 bf16 peak),
for every combination of {eager, compiled} x {plain PyTorch loop, Lightning Trainer} on synthetic batches that already sit
on the device, then (with ``data_root``) the real data path alone and the model fed by it. Everything goes into a JSON.

Arguments are ``key=value`` pairs merged over ``conf/bench.yaml`` (OmegaConf dot-list; lists as ``compile=[true]``).
Without CUDA the models are shrunk (``tiny=auto``) so the bench runs on a CPU for correctness; its speed means nothing there.
Batches are ``(images (N, 3, S, S), labels (N,))``; pre-training modules draw their own masks (1 = masked).
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mimlab.train import CONFIG_DIR
from mimlab.utils.fast_paths import set_fused_attn
from mimlab.utils.flops import flops_method, train_flops_per_image

BENCH_CONFIG = Path(CONFIG_DIR) / "bench.yaml"
GIB = 1024**3


# --------------------------------------------------------------------------------------------------- workloads
def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tempfile.gettempdir()}/mimlab-bench", *overrides])


def _data_overrides(cfg: DictConfig, img_size: int | None) -> list[str]:
    out = [f"data.batch_size={cfg.batch}", f"hardware.num_workers={cfg.workers}"]
    if cfg.data_root:
        if not any(o.startswith("data=") for o in cfg.overrides):
            out.append("data=imagenet")
        out.append(f"data.root={cfg.data_root}")
    if img_size is not None:
        out.append(f"data.img_size={img_size}")
    return out


class ExperimentWorkload:
    """Any recipe: compose ``conf/experiment/<experiment>.yaml`` (+ ``overrides``) and instantiate its task module, so
    the bench times the real pre-training or fine-tuning LightningModule. ``tiny_overrides`` shrink it for the CPU mode."""

    def __init__(self, experiment: str, overrides: list[str] | None = None, tiny_overrides: list[str] | None = None) -> None:
        self.experiment = experiment
        self.overrides = list(overrides or [])
        self.tiny_overrides = list(tiny_overrides) if tiny_overrides is not None else None

    def unavailable(self, tiny: bool) -> str | None:
        if not (Path(CONFIG_DIR) / "experiment" / f"{self.experiment}.yaml").is_file():
            return f"conf/experiment/{self.experiment}.yaml does not exist"
        if tiny and self.tiny_overrides is None:
            return "no tiny_overrides in conf/bench.yaml for the CPU mode"
        return None

    def build(self, cfg: DictConfig, hardware: str, tiny: bool) -> tuple[L.LightningModule, DictConfig]:
        overrides = [f"experiment={self.experiment}", f"hardware={hardware}", "logger=none", *self.overrides,
                     *(self.tiny_overrides if tiny else []), *_data_overrides(cfg, None), *cfg.overrides]
        composed = _compose(overrides)
        return instantiate(composed.method), composed


# --------------------------------------------------------------------------------------------------- FLOPs
def _loss(out: Any) -> Tensor:
    return out["loss"] if isinstance(out, dict) else out


def _quiet_step(module: L.LightningModule, batch: Any, index: int) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer
        return _loss(module.training_step(batch, index))


# --------------------------------------------------------------------------------------------------- timing
class _Repeat(Dataset):
    """The same on-device batch ``length`` times (synthetic data with no loader cost)."""

    def __init__(self, batch: tuple[Tensor, Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batch


class _BenchData(L.LightningDataModule):
    def __init__(self, loader: DataLoader, batch_size: int) -> None:
        super().__init__()
        self.loader, self.batch_size = loader, batch_size

    def train_dataloader(self) -> DataLoader:
        return self.loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _figures(batch: int, steps: int, seconds: float, device: torch.device) -> dict[str, Any]:
    return {"img_s": batch * steps / seconds, "ms_step": 1000 * seconds / steps, "peak_mem_gib": _peak_gib(device)}


def time_plain(module: L.LightningModule, batches: Iterator, steps: int, warmup: int, device: torch.device,
               bf16: bool, fused: bool, batch_size: int, on_batch: Callable[[Any], Any] = lambda b: b) -> dict[str, Any]:
    """A plain loop: ``training_step`` under autocast, backward, AdamW step, ``zero_grad(set_to_none=True)``."""
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            _reset_peak(device)
            start = time.perf_counter()
        batch = on_batch(next(batches))
        with autocast:
            loss = _quiet_step(module, batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return _figures(batch_size, steps, time.perf_counter() - start, device)


class _StepTimer(L.Callback):
    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.start = self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _sync(self.device)
            _reset_peak(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            _sync(self.device)
            self.seconds = time.perf_counter() - self.start


def time_lightning(module: L.LightningModule, batch: tuple[Tensor, Tensor], steps: int, warmup: int,
                   device: torch.device, bf16: bool) -> dict[str, Any]:
    """``lightning.Trainer(precision=bf16-mixed)`` over on-device batches, ``self.log`` every step as in real runs."""
    timer = _StepTimer(warmup, steps, device)
    loader = DataLoader(_Repeat(batch, warmup + steps), batch_size=None, num_workers=0)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed" if bf16 else "32-true",
        max_steps=warmup + steps, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=_BenchData(loader, batch[0].shape[0]))
    return _figures(batch[0].shape[0], steps, timer.seconds, device)


def _cycle(make: Callable[[], Any]) -> Iterator:
    while True:
        yield from make()


def time_loader(datamodule: L.LightningDataModule, steps: int, warmup: int, device: torch.device,
                batch_size: int) -> dict[str, Any]:
    """The real data path alone: decode + augment in the workers, host-to-device copy, ``on_after_batch_transfer``."""
    batches = _cycle(datamodule.train_dataloader)
    move = _mover(datamodule, device)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        move(next(batches))
    _sync(device)
    return _figures(batch_size, steps, time.perf_counter() - start, device)


def _mover(datamodule: L.LightningDataModule, device: torch.device) -> Callable[[Any], Any]:
    def move(batch: Any) -> Any:  # what Lightning does between the loader and training_step
        return datamodule.on_after_batch_transfer(datamodule.transfer_batch_to_device(batch, device, 0), 0)

    return move


# --------------------------------------------------------------------------------------------------- driver
def _prepare(module: L.LightningModule, device: torch.device, hardware: DictConfig, compiled: bool,
             compile_mode: str | None) -> L.LightningModule:
    set_fused_attn(module, hardware.get("fused_attn", True))
    module.to(device)
    if hardware.get("channels_last", False):
        module.to(memory_format=torch.channels_last)
    if compiled:
        module.compile(**({"mode": compile_mode} if compile_mode else {}))
    return module


def bench_workload(name: str, workload: Any, cfg: DictConfig, device: torch.device, tiny: bool) -> dict[str, Any]:
    reason = workload.unavailable(tiny)
    if reason:
        return {"model": name, "skipped": reason}
    hardware = "gpu" if device.type == "cuda" else "cpu"
    bf16 = device.type == "cuda"
    module, composed = workload.build(cfg, hardware, tiny)
    img = int(composed.data.img_size)
    classes = getattr(module, "num_classes", None) or 10
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(cfg.batch, 3, img, img, generator=gen).to(device),
             torch.randint(0, classes, (cfg.batch,), generator=gen).to(device))
    module.to(device)
    two = (batch[0][:2], batch[1][:2])
    flops = train_flops_per_image(module, lambda: _quiet_step(module, two, 0), 2)
    params = sum(p.numel() for p in module.parameters())
    result: dict[str, Any] = {"model": name, "batch": cfg.batch, "img_size": img, "tiny": tiny, "params": params,
                              "train_gflop_per_img": flops / 1e9, "flops_method": flops_method(module), "runs": []}

    def mfu(img_s: float) -> float:
        return img_s * flops / (cfg.peak_tflops * 1e12)

    fused = bool(composed.hardware.fused_optimizer)
    for compiled in cfg.compile:
        for loop in cfg.loops:
            module, _ = workload.build(cfg, hardware, tiny)
            module = _prepare(module, device, composed.hardware, bool(compiled), cfg.compile_mode)
            if loop == "plain":
                figures = time_plain(module, _cycle(lambda: [batch]), cfg.steps, cfg.warmup, device, bf16, fused, cfg.batch)
            elif loop == "lightning":
                figures = time_lightning(module, batch, cfg.steps, cfg.warmup, device, bf16)
            else:
                raise ValueError(f"conf/bench.yaml: loops entries must be 'plain' or 'lightning', got {loop!r}")
            result["runs"].append({"loop": loop, "compiled": bool(compiled), "data": "synthetic-on-device",
                                   **figures, "mfu": mfu(figures["img_s"])})
    by = {(r["loop"], r["compiled"]): r["img_s"] for r in result["runs"]}
    for compiled in cfg.compile:
        if ("plain", bool(compiled)) in by and ("lightning", bool(compiled)) in by:
            key = "lightning_overhead_compiled" if compiled else "lightning_overhead_eager"
            result[key] = 1.0 - by[("lightning", bool(compiled))] / by[("plain", bool(compiled))]
    if cfg.real_data and cfg.data_root:
        result.update(_bench_real_data(workload, cfg, composed, device, tiny, bf16, fused, mfu, result))
    elif cfg.real_data:
        result["real_data"] = "skipped: set data_root=<ImageNet-layout folder>"
    return result


def _bench_real_data(workload, cfg, composed, device, tiny, bf16, fused, mfu, result) -> dict[str, Any]:
    datamodule = instantiate(composed.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = time_loader(datamodule, cfg.steps, cfg.warmup, device, cfg.batch)
    compiled = bool(cfg.compile[-1]) if len(cfg.compile) else False
    module, _ = workload.build(cfg, "gpu" if device.type == "cuda" else "cpu", tiny)
    module = _prepare(module, device, composed.hardware, compiled, cfg.compile_mode)
    end_to_end = time_plain(module, _cycle(datamodule.train_dataloader), cfg.steps, cfg.warmup, device, bf16, fused,
                            cfg.batch, on_batch=_mover(datamodule, device))
    best_synthetic = max((r["img_s"] for r in result["runs"]), default=float("nan"))
    return {"real_data": {"workers": cfg.workers, "datamodule": type(datamodule).__name__,
                          "loader_img_s": loader["img_s"], "loader_over_model": loader["img_s"] / best_synthetic,
                          "end_to_end": {"loop": "plain", "compiled": compiled, **end_to_end, "mfu": mfu(end_to_end["img_s"])}}}


def load_config(argv: list[str]) -> DictConfig:
    """conf/bench.yaml with ``key=value`` arguments merged over it; ``model`` may be a comma-separated list or ``all``."""
    base = OmegaConf.load(BENCH_CONFIG)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"mimlab.bench: arguments are key=value pairs over conf/bench.yaml, got {bad}")
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    for key in ("compile", "loops"):
        if not OmegaConf.is_list(cfg[key]):
            cfg[key] = [cfg[key]]
    return cfg


def run(argv: list[str]) -> dict[str, Any]:
    cfg = load_config(argv)
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    tiny = (device.type == "cpu") if cfg.tiny == "auto" else bool(cfg.tiny)
    names = list(cfg.workloads) if cfg.model == "all" else [m.strip() for m in str(cfg.model).split(",")]
    unknown = [n for n in names if n not in cfg.workloads]
    if unknown:
        raise SystemExit(f"mimlab.bench: unknown model {unknown}; choose from conf/bench.yaml workloads: {list(cfg.workloads)}")
    torch.set_float32_matmul_precision("high" if device.type == "cuda" else "highest")
    results = [bench_workload(n, instantiate(cfg.workloads[n]), cfg, device, tiny) for n in names]
    payload = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "lightning": L.__version__, "peak_tflops": cfg.peak_tflops,
        "settings": {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k]
                     for k in ("batch", "steps", "warmup", "compile", "compile_mode", "loops", "workers", "data_root")},
        "note": "CPU figures check correctness only; speed is judged on the GPU" if device.type == "cpu" else "",
        "results": results,
    }
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(payload, indent=2))
    _print_table(payload, cfg.out)
    return payload


def _print_table(payload: dict[str, Any], out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mimlab bench on {payload['device']} (MFU vs {payload['peak_tflops']} TFLOP/s)")
    for column in ("model", "GFLOP/img", "loop", "compiled", "data", "img/s", "ms/step", "peak GiB", "MFU"):
        table.add_column(column)
    for res in payload["results"]:
        if "skipped" in res:
            table.add_row(res["model"], "", "", "", "skipped: " + res["skipped"], "", "", "", "")
            continue
        rows = list(res["runs"])
        real = res.get("real_data")
        if isinstance(real, dict):
            rows.append({**real["end_to_end"], "data": f"real ({real['loader_img_s']:.0f} img/s loader)"})
        for r in rows:
            peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            table.add_row(res["model"], f"{res['train_gflop_per_img']:.3g}", r["loop"], str(r["compiled"]),
                          r.get("data", ""), f"{r['img_s']:.0f}", f"{r['ms_step']:.1f}", peak, f"{100 * r['mfu']:.1f}%")
    Console(width=160).print(table)
    print(f"wrote {out}")


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
