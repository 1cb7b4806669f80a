"""``mimlab-bench key=value ...`` (or ``python -m mimlab.bench``; ``--help`` lists the keys): arguments over
``conf/bench.yaml``, the driver, the JSON and the table.

Without CUDA the models are shrunk (``tiny=auto``) and the CPU threads are pinned (``threads``), so the bench checks
correctness on a CPU; medians and spreads over ``repeats`` windows make its ratios readable there too.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mimlab.bench.datapath import compare_loaders, write_imagenet_like_jpegs
from mimlab.bench.graphs import explain_step
from mimlab.bench.timing import cycle, mover, time_lightning, time_loader, time_plain
from mimlab.bench.workloads import loader_batch, mask_timing, quiet_step
from mimlab.train import CONFIG_DIR
from mimlab.utils.fast_paths import set_fused_attn
from mimlab.utils.flops import flops_method, train_flops_per_image

BENCH_CONFIG = Path(CONFIG_DIR) / "bench.yaml"


# --------------------------------------------------------------------------------------------------- driver
def _prepare(
    module: L.LightningModule, device: torch.device, hardware: DictConfig, compiled: bool, compile_mode: str | None
) -> L.LightningModule:
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
    images = torch.randn(cfg.batch, 3, img, img, generator=gen).to(device)
    labels = torch.randint(0, classes, (cfg.batch,), generator=gen).to(device)
    batch = loader_batch(module, images, labels)
    module.to(device)
    two = loader_batch(module, images[:2], labels[:2])
    flops = train_flops_per_image(module, lambda: quiet_step(module, two, 0), 2)
    params = sum(p.numel() for p in module.parameters())
    result: dict[str, Any] = {
        "model": name,
        "batch": cfg.batch,
        "img_size": img,
        "tiny": tiny,
        "params": params,
        "train_gflop_per_img": flops / 1e9,
        "flops_method": flops_method(module),
        "runs": [],
        "masks": mask_timing(module, cfg.batch, img),
    }
    if cfg.explain:
        result["graph"] = explain_step(module, two)

    def mfu(img_s: float) -> float:
        return img_s * flops / (cfg.peak_tflops * 1e12)

    fused = bool(composed.hardware.fused_optimizer)
    for compiled in cfg.compile:
        for loop in cfg.loops:
            module, _ = workload.build(cfg, hardware, tiny)
            module = _prepare(module, device, composed.hardware, bool(compiled), cfg.compile_mode)
            if loop == "plain":
                figures = time_plain(
                    module, cycle(lambda: [batch]), cfg.steps, cfg.warmup, cfg.repeats, device, bf16, fused, cfg.batch
                )
            elif loop == "lightning":
                figures = time_lightning(module, batch, cfg.steps, cfg.warmup, cfg.repeats, device, bf16)
            else:
                raise ValueError(f"conf/bench.yaml: loops entries must be 'plain' or 'lightning', got {loop!r}")
            result["runs"].append(
                {
                    "loop": loop,
                    "compiled": bool(compiled),
                    "data": "synthetic-on-device",
                    **figures,
                    "mfu": mfu(figures["img_s"]),
                }
            )
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
    loader = time_loader(datamodule, cfg.steps, cfg.warmup, cfg.repeats, device, cfg.batch)
    compiled = bool(cfg.compile[-1]) if len(cfg.compile) else False
    module, _ = workload.build(cfg, "gpu" if device.type == "cuda" else "cpu", tiny)
    module = _prepare(module, device, composed.hardware, compiled, cfg.compile_mode)
    end_to_end = time_plain(
        module,
        cycle(datamodule.train_dataloader),
        cfg.steps,
        cfg.warmup,
        cfg.repeats,
        device,
        bf16,
        fused,
        cfg.batch,
        on_batch=mover(datamodule, device),
    )
    best_synthetic = max((r["img_s"] for r in result["runs"]), default=float("nan"))
    return {
        "real_data": {
            "workers": cfg.workers,
            "datamodule": type(datamodule).__name__,
            "loader_img_s": loader["img_s"],
            "loader_over_model": loader["img_s"] / best_synthetic,
            "end_to_end": {"loop": "plain", "compiled": compiled, **end_to_end, "mfu": mfu(end_to_end["img_s"])},
        }
    }


def load_config(argv: list[str]) -> DictConfig:
    """conf/bench.yaml with ``key=value`` arguments merged over it; ``model`` may be a comma-separated list or ``all``."""
    base = OmegaConf.load(BENCH_CONFIG)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"mimlab.bench: arguments are key=value pairs over conf/bench.yaml, got {bad}")
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    for key in ("compile", "loops"):
        if not OmegaConf.is_list(cfg[key]):  # type: ignore[index]
            cfg[key] = [cfg[key]]  # type: ignore[index]
    return cfg  # type: ignore[return-value]


def run(argv: list[str]) -> dict[str, Any]:
    cfg = load_config(argv)
    device = torch.device(
        "cuda"
        if (cfg.device == "auto" and torch.cuda.is_available())
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    tiny = (device.type == "cpu") if cfg.tiny == "auto" else bool(cfg.tiny)
    names = list(cfg.workloads) if cfg.model == "all" else [m.strip() for m in str(cfg.model).split(",")]
    unknown = [n for n in names if n not in cfg.workloads]
    if unknown:
        raise SystemExit(
            f"mimlab.bench: unknown model {unknown}; choose from conf/bench.yaml workloads: {list(cfg.workloads)}"
        )
    torch.set_float32_matmul_precision("high" if device.type == "cuda" else "highest")
    threads = int(cfg.threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)  # fixed, so CPU figures of different runs compare
    if cfg.overhead:
        return _run_overhead(cfg, device, threads)
    results = [bench_workload(n, instantiate(cfg.workloads[n]), cfg, device, tiny) for n in names]
    datapath = _datapath(cfg) if cfg.datapath else None
    payload = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "peak_tflops": cfg.peak_tflops,
        "threads": threads,
        "settings": {
            k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in ("batch", "steps", "warmup", "repeats", "compile", "compile_mode", "loops", "workers", "data_root")
        },
        "datapath": datapath,
        "note": "CPU figures check correctness only; speed is judged on the GPU" if device.type == "cpu" else "",
        "results": results,
    }
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(payload, indent=2))
    _print_table(payload, cfg.out)
    return payload


def _run_overhead(cfg: DictConfig, device: torch.device, threads: int) -> dict[str, Any]:
    """``overhead=true``: the Trainer's and each callback's cost per step (:mod:`mimlab.bench.overhead`)."""
    from mimlab.bench.overhead import print_overhead, run_overhead

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    result = run_overhead(cfg, device)
    payload = {"device": name, "torch": torch.__version__, "lightning": L.__version__, "overhead": result}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(payload, indent=2))
    print_overhead(result, name)
    print(f"wrote {cfg.out}")
    return payload


def _datapath(cfg: DictConfig) -> dict[str, Any]:
    """Our train loader vs the official MAE loader on ``data_root`` (or generated ImageNet-size JPEGs)."""
    root = (
        Path(cfg.data_root)
        if cfg.data_root
        else write_imagenet_like_jpegs(Path(tempfile.mkdtemp(prefix="mimlab-jpeg-")))
    )
    return {
        "generated": not cfg.data_root,
        **compare_loaders(
            root, cfg.datapath_img_size, cfg.datapath_batch, cfg.workers, cfg.datapath_batches, cfg.datapath_rounds
        ),
    }


def _print_table(payload: dict[str, Any], out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mimlab bench on {payload['device']} (MFU vs {payload['peak_tflops']} TFLOP/s)")
    for column in (
        "model",
        "GFLOP/img",
        "loop",
        "compiled",
        "data",
        "img/s (median)",
        "spread",
        "ms/step",
        "peak GiB",
        "MFU",
    ):
        table.add_column(column)
    for res in payload["results"]:
        if "skipped" in res:
            table.add_row(res["model"], "", "", "", "skipped: " + res["skipped"], "", "", "", "", "")
            continue
        rows = list(res["runs"])
        real = res.get("real_data")
        if isinstance(real, dict):
            rows.append({**real["end_to_end"], "data": f"real ({real['loader_img_s']:.0f} img/s loader)"})
        for r in rows:
            peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            table.add_row(
                res["model"],
                f"{res['train_gflop_per_img']:.3g}",
                r["loop"],
                str(r["compiled"]),
                r.get("data", ""),
                f"{r['img_s']:.0f}",
                f"±{50 * r['spread']:.0f}%",
                f"{r['ms_step']:.1f}",
                peak,
                f"{100 * r['mfu']:.1f}%",
            )
    console = Console(width=170)
    console.print(table)
    for res in payload["results"]:
        if "graph" in res:
            graph = res["graph"]
            console.print(
                f"{res['model']}: training_step compiles to {graph['graphs']} graphs, {graph['graph_breaks']} graph breaks"
            )
            for reason in graph["break_reasons"] if graph["graph_breaks"] else []:  # with 0 breaks: why the graph ended
                console.print(f"    break: {reason}", highlight=False)
        masks = res.get("masks")
        if masks:
            console.print(
                f"{res['model']}: masks ({masks['generator']}) drawn in the loader workers, "
                f"{masks['worker_ms']:.1f} ms per batch of {masks['batch']} there"
                + ("" if masks["per_image"] else " (per batch: block sizes shared by the batch, as the official code)")
                + f"; main process {masks['step_ms']:.3f} ms per batch (goal <= 1 ms)",
                highlight=False,
            )
        for key in ("lightning_overhead_eager", "lightning_overhead_compiled"):
            if key in res:
                console.print(f"{res['model']}: {key.replace('_', ' ')} {100 * res[key]:.1f}% (goal <= 2%)")
    data = payload.get("datapath")
    if data:
        rounds = ", ".join(f"{r:.2f}" for r in data["ratio_per_round"])
        workers = ", ".join(f"{r:.2f}" for r in data["ratio_workers_per_round"])
        console.print(
            f"data path, {data['workers']} workers, batch {data['batch']} ({'generated' if data['generated'] else data['root']}): "
            f"mimlab / official MAE loader = {data['ratio_median']:.2f}x normalised on this CPU (rounds {rounds}), "
            f"{data['ratio_workers_median']:.2f}x workers alone, normalised on the GPU (rounds {workers}); goal >= 1.0"
        )
    print(f"wrote {out}")


def help_text() -> str:
    """Usage, then every top-level key of conf/bench.yaml with its default and its comment, then the workloads."""
    keys = [
        m.groups()
        for line in BENCH_CONFIG.read_text().splitlines()
        if (m := re.match(r"(\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$", line)) and m[1] != "workloads"
    ]
    width = max(len(f"{key}={default}") for key, default, _ in keys)
    return "\n".join(
        [
            "usage: mimlab-bench [key=value ...]   (or python -m mimlab.bench; make bench ARGS=\"key=value ...\")",
            "",
            " ".join(__doc__.split("\n\n")[1].split()),
            "",
            f"keys ({BENCH_CONFIG}):",
            *(f"  {f'{key}={default}':<{width}}  {comment or ''}".rstrip() for key, default, comment in keys),
            "",
            "workloads (model=...): " + ", ".join(OmegaConf.load(BENCH_CONFIG).workloads),
        ]
    )


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(help_text())
        return
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
