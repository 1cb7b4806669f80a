"""GPU acceptance run: ``python scripts/gpu_check.py`` (``make gpu-check``) -> ``outputs/gpu_check/results.{json,md}``.

One command that proves the GPU paths on one H100/H200 inside a short machine lease (budget: 8 minutes):

* ``bench``: ``python -m mimlab.bench`` for every workload, eager and compiled, bf16, plain loop (and, for MAE-B, the
  Lightning Trainer too, so the Lightning overhead is measured) — img/s, MFU, peak memory;
* ``train``: 30 steps of each paper-size pre-training recipe (``mae_vit_b``, ``fcmae_convnextv2_base``,
  ``itpn_base_pixel``, ``img2vec_vit_b`` with a random teacher) through ``python -m mimlab.train ... hardware=gpu`` on
  generated JPEGs, so the real Trainer path with compile, bf16, fused AdamW, callbacks and checkpointing runs;
* ``ddp``: the same for MAE-B with ``hardware=ddp`` on one process;
* ``loader``: the CPU (PIL) loader and the GPU-decode loader on generated 500x375 JPEGs, in img/s
  (``mimlab.bench.datapath.time_data_option``, one process each: ``python scripts/gpu_check.py --time-loader <option>``).

Compilation dominates a cold run (35-145 s per model and shape), so the run has two phases. Phase 1 runs the train
checks and a one-step compile of every bench workload *concurrently* (their figures are correctness checks, not
speed: they share the GPU and the CPUs), which fills inductor's on-disk caches. Phase 2 then times the bench workloads
one at a time, alone on the machine, with warm caches. Every check runs in its own process with a time limit; the
whole run has a deadline (``--budget``), checks that no longer fit are reported as skipped, and the result files are
rewritten after every check, so a run stopped early still leaves its figures.

Without CUDA (``--mode cpu``, the default there) the same checks run at tiny sizes in about a minute, so CI keeps the
script working (``tests/test_gpu_check.py``); its speed figures mean nothing. The generated JPEGs come from the one
synthetic-image writer, ``mimlab.data.synthetic.write_image_folder``. A script, not part of the package: it needs a
clone (``conf/``) and the ``mimlab`` package importable (``make install``, or ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()

# Goals on one H100 (docs/performance.md): compiled img/s per workload, the Lightning overhead and the loader ratio.
GOALS_IMG_S = {"mae_vit_b": 4300, "vit_b_finetune": 3250, "fcmae_convnextv2_b": 1400, "convnextv2_b_finetune": 1350}
GOAL_LIGHTNING_OVERHEAD = 0.02
GOAL_LOADER_OVER_MODEL = 1.1


@dataclass
class Check:
    """One command of the acceptance run; ``phase`` 1 runs concurrently, phase 2 alone and in order."""

    name: str
    kind: str  # bench | train | loader
    argv: list[str]
    phase: int
    timeout_s: float
    outputs: dict[str, str] = field(default_factory=dict)
    status: str = "pending"  # pending | ok | failed | timeout | skipped
    seconds: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# --------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Sizes:
    """What differs between the GPU run and the CPU smoke run."""

    gpu: bool
    train_steps: int
    train_batch: int
    train_img: int
    bench_steps: int
    bench_warmup: int
    loader_images: int
    loader_batch: int
    workers: int
    train_workers: int
    log_every: int


GPU_SIZES = Sizes(
    gpu=True,
    train_steps=30,
    train_batch=64,
    train_img=224,
    bench_steps=15,
    bench_warmup=4,
    loader_images=1536,
    loader_batch=256,
    workers=12,
    train_workers=4,
    log_every=5,
)
CPU_SIZES = Sizes(
    gpu=False,
    train_steps=3,
    train_batch=8,
    train_img=64,
    bench_steps=2,
    bench_warmup=1,
    loader_images=64,
    loader_batch=16,
    workers=2,
    train_workers=2,
    log_every=1,
)

# (bench workload, batch on the GPU): the batches of the measured anchors (docs/performance.md).
BENCH_WORKLOADS = (
    ("mae_vit_b", 256),
    ("vit_b_finetune", 256),
    ("fcmae_convnextv2_b", 128),
    ("convnextv2_b_finetune", 128),
    ("itpn_b", 256),
    ("img2vec_vit_b", 256),
)
# (check name, paper recipe on the GPU, CPU-size recipe, extra overrides)
TRAIN_RECIPES: tuple[tuple[str, str, str, list[str]], ...] = (
    ("mae_vit_b", "mae_vit_b", "mae_vit_tiny_synthetic", []),
    ("fcmae_convnextv2_base", "fcmae_convnextv2_base", "fcmae_convnextv2_atto_synthetic", []),
    ("itpn_base_pixel", "itpn_base_pixel", "itpn_hivit_tiny_synthetic", []),
    ("img2vec_vit_b", "img2vec_vit_b", "img2vec_vit_tiny_synthetic", ["target.checkpoint=null"]),  # random teacher
)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def plan(out: Path, sizes: Sizes) -> list[Check]:
    """Every check of the run, in the order phase 2 times them (most important first)."""
    data = out / "data"
    checks: list[Check] = []
    hardware = "gpu" if sizes.gpu else "cpu"
    img = sizes.train_img if sizes.gpu else 96  # FCMAE's 32-px mask units need >= 3 units a side on the CPU too
    for name, recipe, cpu_recipe, extra in TRAIN_RECIPES:
        checks.append(
            Check(
                name=f"train/{name}",
                kind="train",
                phase=1,
                timeout_s=300,
                argv=_python(
                    "-m",
                    "mimlab.train",
                    f"experiment={recipe if sizes.gpu else cpu_recipe}",
                    f"hardware={hardware}",
                    "data=imagenet",
                    f"data.root={data / 'train_set'}",
                    f"data.batch_size={sizes.train_batch}",
                    f"data.img_size={img}",
                    f"hardware.num_workers={sizes.train_workers}",
                    f"trainer.max_steps={sizes.train_steps}",
                    f"trainer.log_every_n_steps={sizes.log_every}",
                    f"trainer.limit_train_batches={sizes.train_steps}",
                    "trainer.limit_val_batches=2",
                    "trainer.max_epochs=1",
                    "logger=csv",
                    f"hydra.run.dir={out / 'runs' / name}",
                    f"name=gpu_check_{name}",
                    *extra,
                ),
            )
        )
    ddp = ["hardware=ddp", "hardware.devices=1"] + (
        []
        if sizes.gpu
        else [
            "hardware.accelerator=cpu",
            "hardware.precision=32-true",
            "hardware.compile=false",
            "hardware.fused_optimizer=false",
            "hardware.pin_memory=false",
            "hardware.matmul_precision=highest",
        ]
    )
    mae = checks[0].argv
    checks.append(
        Check(
            name="train/mae_vit_b_ddp1",
            kind="train",
            phase=1,
            timeout_s=300,
            argv=[
                *[a for a in mae if not a.startswith(("hardware=", "hydra.run.dir=", "name="))],
                *ddp,
                f"hydra.run.dir={out / 'runs' / 'mae_vit_b_ddp1'}",
                "name=gpu_check_mae_vit_b_ddp1",
            ],
        )
    )
    for workload, batch in BENCH_WORKLOADS:
        loops = "[plain,lightning]" if workload == "mae_vit_b" else "[plain]"
        common = [f"model={workload}", f"batch={batch if sizes.gpu else 4}", f"loops={loops}", "real_data=false"]
        if sizes.gpu:  # fill the compile caches while phase 1 runs (CPU mode times eager only)
            checks.append(
                Check(
                    name=f"warm/{workload}",
                    kind="bench",
                    phase=1,
                    timeout_s=300,
                    argv=_python(
                        "-m",
                        "mimlab.bench",
                        *common,
                        "compile=[true]",
                        "steps=1",
                        "warmup=1",
                        f"out={out / 'bench' / f'warm_{workload}.json'}",
                    ),
                )
            )
        checks.append(
            Check(
                name=f"bench/{workload}",
                kind="bench",
                phase=2,
                timeout_s=240,
                argv=_python(
                    "-m",
                    "mimlab.bench",
                    *common,
                    f"compile={'[false,true]' if sizes.gpu else '[false]'}",
                    f"steps={sizes.bench_steps}",
                    f"warmup={sizes.bench_warmup}",
                    f"out={out / 'bench' / f'{workload}.json'}",
                ),
                outputs={"json": str(out / "bench" / f"{workload}.json")},
            )
        )
    # phase 1 starts the compile warm-ups of the workloads with speed goals first (phase 2 needs their caches)
    goals = [c for c in checks if c.name.startswith("warm/") and c.name.split("/")[1] in GOALS_IMG_S]
    checks = goals + [c for c in checks if c not in goals]
    loader_root = data / "jpeg_500x375"
    for option in ("imagenet", "imagenet_gpu_decode"):
        checks.append(
            Check(
                name=f"loader/{option}",
                kind="loader",
                phase=2,
                timeout_s=120,
                argv=_python(
                    str(SCRIPT),
                    "--time-loader",
                    option,
                    "--root",
                    str(loader_root),
                    "--batch",
                    str(sizes.loader_batch),
                    "--workers",
                    str(sizes.workers),
                    "--json",
                    str(out / "bench" / f"loader_{option}.json"),
                ),
                outputs={"json": str(out / "bench" / f"loader_{option}.json")},
            )
        )
    return checks


# --------------------------------------------------------------------------------------------------- data
def write_data(out: Path, sizes: Sizes) -> None:
    """The train set (random sizes; one epoch covers the train steps) and the loader set (500x375), in the ImageNet
    layout, from 16 random streams written by up to 16 processes."""
    from mimlab.data.synthetic import write_image_folder

    data = out / "data"
    processes = max(1, min(16, os.cpu_count() or 1))
    per_class = -(-sizes.train_steps * sizes.train_batch // 10)
    lo, hi = (160, 320) if sizes.gpu else (96, 128)
    write_image_folder(
        data / "train_set", {"train": per_class, "val": 2}, min_size=lo, max_size=hi, streams=16, processes=processes
    )
    write_image_folder(
        data / "jpeg_500x375",
        {"train": -(-sizes.loader_images // 10), "val": 1},
        min_size=300,
        max_size=500,
        sizes=[(500, 375)],
        streams=16,
        processes=processes,
    )


# --------------------------------------------------------------------------------------------------- running
def _run(check: Check, deadline: float, logs: Path) -> None:
    remaining = deadline - time.monotonic()
    if remaining < 20:
        check.status, check.error = "skipped", "no time left in the budget"
        return
    log = logs / (check.name.replace("/", "__") + ".log")
    start = time.monotonic()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    }
    with open(log, "w") as handle:
        try:
            proc = subprocess.run(
                check.argv, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=min(check.timeout_s, remaining)
            )
            check.status = "ok" if proc.returncode == 0 else "failed"
            if proc.returncode != 0:
                check.error = f"exit {proc.returncode}: " + _tail(log)
        except subprocess.TimeoutExpired:
            check.status, check.error = (
                "timeout",
                f"stopped after {min(check.timeout_s, remaining):.0f} s: " + _tail(log),
            )
    check.seconds = round(time.monotonic() - start, 1)
    check.outputs["log"] = str(log)
    if check.status == "ok":
        check.figures = _figures(check)


def _tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:])[-1500:]


def _figures(check: Check) -> dict[str, Any]:
    if check.kind == "bench" and "json" in check.outputs:
        return _bench_figures(json.loads(Path(check.outputs["json"]).read_text()))
    if check.kind == "loader":
        return json.loads(Path(check.outputs["json"]).read_text())
    if check.kind == "train":
        return _train_figures(Path(next(a.split("=", 1)[1] for a in check.argv if a.startswith("hydra.run.dir="))))
    return {}


def _bench_figures(payload: dict[str, Any]) -> dict[str, Any]:
    res = payload["results"][0]
    if "skipped" in res:
        return {"skipped": res["skipped"]}
    out: dict[str, Any] = {
        "device": payload["device"],
        "batch": res["batch"],
        "params_m": res["params"] / 1e6,
        "gflop_per_img": res["train_gflop_per_img"],
    }
    for run in res["runs"]:
        key = f"{run['loop']}_{'compiled' if run['compiled'] else 'eager'}"
        out[key] = {k: run[k] for k in ("img_s", "ms_step", "peak_mem_gib", "mfu")}
    for key in ("lightning_overhead_eager", "lightning_overhead_compiled", "masks", "graph"):
        if res.get(key) is not None:  # masks: host mask time (worker, main process); graph: with explain=true
            out[key] = res[key]
    return out


def _train_figures(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run_dir": str(run_dir), "last_ckpt": (run_dir / "checkpoints" / "last.ckpt").is_file()}
    metrics = run_dir / "csv" / "metrics.csv"
    if metrics.is_file():
        rows = list(csv.DictReader(metrics.open()))
        steps = [int(r["step"]) for r in rows if r.get("step")]
        out["last_step"] = max(steps) if steps else None
        for key in rows[0] if rows else []:
            if key.endswith(("loss_step", "img_per_s", "mfu", "gpu_mem_alloc_gb")):
                values = [float(r[key]) for r in rows if r.get(key)]
                if values:
                    out[key] = {"first": values[0], "last": values[-1]}
    return out


# --------------------------------------------------------------------------------------------------- report
def write_reports(out: Path, checks: list[Check], meta: dict[str, Any]) -> None:
    payload = {**meta, "checks": [asdict(c) for c in checks]}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(markdown(checks, meta))


def _fmt(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(checks: list[Check], meta: dict[str, Any]) -> str:
    lines = [
        f"# mimlab GPU check — {meta.get('device', '?')}",
        "",
        f"mode {meta['mode']}, torch {meta.get('torch')}, wall {meta.get('wall_s', '?')} s of {meta['budget_s']} s budget",
        "",
        "## Bench (synthetic batches on the device, bf16; one workload at a time, warm compile caches)",
        "",
        "| workload | batch | GFLOP/img | eager img/s | compiled img/s | goal | compiled MFU | peak GiB | Lightning overhead (eager / compiled, goal ≤ 2%) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        if c.kind != "bench" or c.phase != 2:
            continue
        name = c.name.split("/", 1)[1]
        f = c.figures
        eager, comp = f.get("plain_eager", {}), f.get("plain_compiled", {})
        over = " / ".join(
            f"{100 * f[k]:.1f}%" for k in ("lightning_overhead_eager", "lightning_overhead_compiled") if k in f
        )
        lines.append(
            f"| {name} | {f.get('batch', '-')} | {_fmt(f.get('gflop_per_img'), '.1f')} | {_fmt(eager.get('img_s'))} "
            f"| {_fmt(comp.get('img_s'))} | {GOALS_IMG_S.get(name, '-')} | {_fmt(comp.get('mfu') and 100 * comp['mfu'], '.1f')}% "
            f"| {_fmt(comp.get('peak_mem_gib'), '.1f')} | {over or '-'} | {c.status} |"
        )
    lines += [
        "",
        "## Real Trainer path (`python -m mimlab.train ... hardware=gpu`, generated JPEGs; run concurrently: correctness, not speed)",
        "",
        "| check | status | seconds | last step | loss first → last | last.ckpt |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        if c.kind != "train":
            continue
        f = c.figures
        loss = f.get("train/loss_step", {})
        lines.append(
            f"| {c.name} | {c.status} | {_fmt(c.seconds)} | {f.get('last_step', '-')} | "
            f"{_fmt(loss.get('first'), '.4f')} → {_fmt(loss.get('last'), '.4f')} | {f.get('last_ckpt', '-')} |"
        )
    lines += [
        "",
        "## Data path (generated 500×375 JPEGs, loader + host-to-device + device transforms, no model)",
        "",
        f"| option | workers | batch | img/s | goal: ≥ {GOAL_LOADER_OVER_MODEL}× the compiled MAE-B rate | status |",
        "|---|---|---|---|---|---|",
    ]
    mae = next((c.figures.get("plain_compiled", {}).get("img_s") for c in checks if c.name == "bench/mae_vit_b"), None)
    for c in checks:
        if c.kind != "loader":
            continue
        rate = c.figures.get("img_s")
        ratio = f"{rate / mae:.2f}×" if rate and mae else "-"
        lines.append(
            f"| {c.name.split('/', 1)[1]} | {c.figures.get('workers', '-')} | {c.figures.get('batch', '-')} "
            f"| {_fmt(rate)} | {ratio} | {c.status} |"
        )
    lines += ["", "## Compile warm-up (phase 1, concurrent)", "", "| check | status | seconds |", "|---|---|---|"]
    lines += [f"| {c.name} | {c.status} | {_fmt(c.seconds)} |" for c in checks if c.name.startswith("warm/")]
    problems = [c for c in checks if c.status not in ("ok",)]
    if problems:
        lines += ["", "## Problems", ""] + [f"- **{c.name}** {c.status}: {c.error}" for c in problems]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- main
def matmul_tflops() -> float | None:
    """Dense bf16 8192^3 matmul rate (TFLOP/s) of this GPU: the MFU denominator measured on the day."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def run(out: Path, mode: str, budget_s: float, parallel: int) -> list[Check]:
    import torch

    sizes = GPU_SIZES if mode == "gpu" else CPU_SIZES
    started = time.monotonic()
    deadline = started + budget_s
    if out.exists():
        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True)
    meta: dict[str, Any] = {
        "mode": mode,
        "budget_s": budget_s,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "matmul_bf16_tflops": matmul_tflops(),
    }
    print(f"mimlab gpu-check ({mode}) on {meta['device']}: writing {out}/results.md", flush=True)
    write_data(out, sizes)
    meta["data_s"] = round(time.monotonic() - started, 1)
    checks = plan(out, sizes)

    def report() -> None:
        meta["wall_s"] = round(time.monotonic() - started, 1)
        write_reports(out, checks, meta)

    def run_one(check: Check) -> None:
        _run(check, deadline, logs)
        print(f"[{time.monotonic() - started:6.0f} s] {check.name}: {check.status} ({check.seconds} s)", flush=True)
        report()

    with ThreadPoolExecutor(max_workers=parallel if sizes.gpu else 1) as pool:
        list(pool.map(run_one, [c for c in checks if c.phase == 1]))
    for check in (c for c in checks if c.phase == 2):
        run_one(check)
    report()
    print((out / "results.md").read_text())
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mimlab GPU acceptance run (CPU smoke mode without CUDA).")
    parser.add_argument("--out", default="outputs/gpu_check")
    parser.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--budget", type=float, default=None, help="seconds (default: 480 on a GPU, 300 on a CPU)")
    parser.add_argument("--parallel", type=int, default=8, help="concurrent phase-1 checks on a GPU")
    one = parser.add_argument_group("one loader check (the run starts one such process per loader option)")
    one.add_argument("--time-loader", metavar="OPTION", help="time the train loader of data=OPTION alone over --root")
    one.add_argument("--root", help="an ImageNet-layout folder")
    one.add_argument("--batch", type=int, default=256)
    one.add_argument("--workers", type=int, default=2)
    one.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.time_loader:
        from mimlab.bench.datapath import time_data_option

        figures = time_data_option(args.time_loader, args.root, args.batch, args.workers)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(figures, indent=2))
        print(json.dumps(figures))
        return 0
    import torch

    mode = ("gpu" if torch.cuda.is_available() else "cpu") if args.mode == "auto" else args.mode
    budget = args.budget if args.budget is not None else (480.0 if mode == "gpu" else 300.0)
    checks = run(Path(args.out), mode, budget, args.parallel)
    return 0 if all(c.status == "ok" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
