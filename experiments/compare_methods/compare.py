"""Measure every pre-training job of a ``compare_methods`` sweep against random init, then one table and plot.

    python -m mimlab.train -m +sweep=compare_methods data.root=/path/to/photos
    python experiments/compare_methods/compare.py outputs/sweeps/compare_methods/<time> [--out DIR] [--transfer] [-- OVERRIDES]

**Representation check** (always): each job's ``checkpoints/last.ckpt`` goes through ``mimlab-export`` (timm, or the
mimlab format where timm has no such model) and the exported encoder is measured by ``mimlab-eval``'s check (kNN and
a linear probe on frozen pooled features of the job's ``data.root``, :mod:`mimlab.evaluation.representation`) beside
two random inits of the same architecture, seeded by the job's seed: the exported model's own (timm's init; the
mimlab class's for a mimlab-format export) and the mimlab backbone's. Results are cached in
``<job>/eval/representation.json``. Rows are grouped by method, mean ± std over the seeds of the sweep and of the
``--also`` sweeps (seeds run later), one row per schedule where a method ran for several; ``knn_margin`` /
``probe_margin`` are each seed's trained figure minus its better random init, ``rank`` / ``cosine`` the trained
features' effective rank and mean pairwise cosine (collapse shows as a low rank and a cosine near 1).

**Transfer** (``--transfer``): for each job ``<sweep>/<n>_experiment=<recipe>`` (its ``checkpoints/last.ckpt``), the transfer recipes of
``transfer.yaml`` run with ``task.pretrained=`` that checkpoint, the job's encoder config group and every encoder key
the pre-training recipe set (so a post-LN, cls-free or widened encoder is rebuilt as trained), the job's seed and
image size, and ``transfer.yaml``'s shared overrides (plus OVERRIDES). Transfer runs land in
``<sweep>/transfer/<job>/{linprobe,finetune}``; a finished one is not rerun. The table (``mimlab.report``'s markdown,
CSV and plot) has one row per method: encoder params, online kNN top-1, linear-probe and fine-tune top-1 (last
epoch), pre-training img/s and GFLOP/img, and the pre-training PFLOP (GFLOP/img x images seen).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from mimlab.report import markdown, read_metrics
from mimlab.train import CONFIG_DIR
from mimlab.utils.hydra_overrides import hydra_value, node_overrides

DIGITS = {"params_M": 2, "cosine": 2, "img_per_s": 0, "gflops_per_img": 3, "pflops": 3}  # else 1
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRANSFERS = ("linprobe", "finetune")
COLUMNS = (
    "params_M",
    "knn",
    "knn_mimlab",
    "knn_timm",
    "knn_margin",
    "probe",
    "probe_mimlab",
    "probe_timm",
    "probe_margin",
    "rank",
    "cosine",
    "linprobe/acc1",
    "finetune/acc1",
    "img_per_s",
    "gflops_per_img",
    "pflops",
)


def pretrain_jobs(sweep: Path) -> list[Path]:
    """The sweep's job folders (``<n>_...`` with ``.hydra/config.yaml``), in job order."""
    jobs = [p for p in sweep.iterdir() if (p / ".hydra" / "config.yaml").exists() and p.name.split("_")[0].isdigit()]
    if not jobs:
        raise FileNotFoundError(f"{sweep}: no sweep job folders (<n>_.../.hydra/config.yaml); run the sweep first")
    return sorted(jobs, key=lambda p: int(p.name.split("_")[0]))


def encoder_overrides(job: Path) -> list[str]:
    """``model/backbone=<group>`` of the job plus ``++model.backbone.<key>=<value>`` for every key its recipe changed or added."""
    choice = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.choices["model/backbone"]
    trained = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml").model.backbone)
    default = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / "backbone" / f"{choice}.yaml"))
    changed = {k: v for k, v in trained.items() if default.get(k, object()) != v}  # type: ignore[union-attr]
    return [f"model/backbone={choice}", *node_overrides("model.backbone", changed)]


def transfer(job: Path, kind: str, recipe: str, shared: list[str], extra: list[str]) -> Path:
    """Run one transfer recipe from ``job``'s last checkpoint (unless done); returns its run folder."""
    out = job.parent / "transfer" / job.name / kind
    if "val/acc1" in read_metrics(out):
        return out
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    checkpoint = job / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint} is missing: the pre-training job {job.name} did not finish")
    cmd = [
        sys.executable, "-m", "mimlab.train", f"experiment={recipe}", f"task.pretrained={hydra_value(str(checkpoint))}",
        *encoder_overrides(job), f"seed={cfg.seed}", f"data.img_size={cfg.data.img_size}",
        f"data.root={hydra_value(cfg.data.root)}", *shared, *extra, f"hydra.run.dir={hydra_value(str(out))}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return out


def encoder_params(job: Path) -> float:
    """Millions of parameters of the job's encoder (rebuilt from its config)."""
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    backbone = instantiate(OmegaConf.to_container(cfg.model.backbone, resolve=True))
    return sum(p.numel() for p in backbone.parameters()) / 1e6


def representation(job: Path, threads: int | None = None) -> dict[str, dict[str, float]]:
    """kNN / linear-probe top-1 of the job's exported encoder and of two random inits (module docstring), cached."""
    cache = job / "eval" / "representation.json"
    if cache.exists():
        return json.loads(cache.read_text())["results"]
    import torch

    from mimlab.checkpoints.encoder import checkpoint_encoder
    from mimlab.checkpoints.export import export, load_exported
    from mimlab.eval import PooledEncoder
    from mimlab.evaluation.representation import Protocol, evaluate_encoders

    if threads:
        torch.set_num_threads(threads)
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    checkpoint = job / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint} is missing: the pre-training job {job.name} did not finish")
    exported = export(checkpoint, job / "eval" / "encoder.pth")
    torch.manual_seed(cfg.seed)
    own_init = PooledEncoder(load_exported(exported.path, random_init=True))
    init_name = "timm" if exported.format == "timm" else "mimlab"
    encoders = {"trained": PooledEncoder(load_exported(exported.path)), f"random init ({init_name})": own_init}
    if init_name == "timm":  # a mimlab-format export is the mimlab class: its own init is the mimlab init
        encoders["random init (mimlab)"] = PooledEncoder(checkpoint_encoder(checkpoint).fresh(cfg.seed))
    protocol = Protocol(img_size=cfg.data.img_size, seed=cfg.seed)
    results = evaluate_encoders(encoders, cfg.data.root, protocol)
    record = {"checkpoint": str(checkpoint), "export": exported.spec, "protocol": protocol.__dict__, "results": results}
    cache.write_text(json.dumps(record, indent=2))
    return results


def row(job: Path, runs: dict[str, Path], measured: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One job's figures: its method name, seed, optimiser steps and the COLUMNS values."""
    pre = read_metrics(job)
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    gflops = pre.get("perf/train_gflops_per_img")
    last_step = pre.get("step")
    steps = None if last_step is None else int(last_step) + 1  # optimiser steps taken (the logged step counts from 0)
    random = [r for name, r in measured.items() if name.startswith("random init")]
    metrics = {
        "params_M": encoder_params(job),
        "knn": measured["trained"]["knn_top1"],
        "knn_random": max(r["knn_top1"] for r in random),
        "probe": measured["trained"]["probe_top1"],
        "probe_random": max(r["probe_top1"] for r in random),
        "rank": measured["trained"].get("effective_rank"),
        "cosine": measured["trained"].get("mean_cosine"),
        **{f"{kind}/acc1": read_metrics(run).get("val/acc1") for kind, run in runs.items()},
        # images ÷ wall-clock seconds of the whole run (WallClockThroughput's last value); runs logged before it had
        # only ThroughputMonitor's windowed train/device/samples_per_sec, read as its median
        "img_per_s": pre.get("perf/img_per_s") or read_metrics(job, "median").get("train/device/samples_per_sec"),
        "gflops_per_img": gflops,
        "pflops": gflops * steps * cfg.data.batch_size / 1e6 if gflops is not None and steps is not None else None,
    }
    metrics["knn_margin"] = metrics["knn"] - metrics["knn_random"]  # over the better random init, per seed
    metrics["probe_margin"] = metrics["probe"] - metrics["probe_random"]
    for name, r in measured.items():
        if name.startswith("random init"):
            tag = name.removeprefix("random init (").removesuffix(")")
            metrics[f"knn_{tag}"], metrics[f"probe_{tag}"] = r["knn_top1"], r["probe_top1"]
    return {
        "method": cfg.name,
        "seed": cfg.seed,
        "steps": steps,
        "metrics": {k: v for k, v in metrics.items() if v is not None},
    }


def by_method(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by method and schedule (first-seen order): ``{"method", "seeds", "mean": {...}, "std": {...}}``.

    A method run for more than one number of optimiser steps (a longer schedule, or a job that stopped early) gets one
    row per step count, labelled ``<method> (<steps> steps)``, so runs of different lengths are never averaged.
    """
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("steps")), []).append(r)
    schedules = Counter(name for name, _ in groups)
    out = []
    for (name, steps), members in groups.items():
        method = f"{name} ({steps:,} steps)" if schedules[name] > 1 else name
        keys = sorted({k for m in members for k in m["metrics"]})
        values = {k: [m["metrics"][k] for m in members if k in m["metrics"]] for k in keys}
        out.append(
            {
                "method": method,
                "seeds": sorted(m["seed"] for m in members),
                "mean": {k: statistics.fmean(v) for k, v in values.items()},
                "std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()},
            }
        )
    return out


def _cell(group: dict[str, Any], key: str) -> str:
    if key not in group["mean"]:
        return "–"
    mean, std = group["mean"][key], group["std"][key]
    digits = DIGITS.get(key, 1)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(group["seeds"]) > 1 else f"{mean:.{digits}f}"


def write_table(groups: list[dict[str, Any]], out: Path) -> str:
    """``results.md``, ``results.csv`` and ``acc1_vs_method.png`` in ``out``; returns the markdown."""
    shown = [c for c in COLUMNS if any(c in g["mean"] for g in groups)]
    lines = [["method", "seeds", *shown]]
    for g in groups:
        lines.append([g["method"], str(len(g["seeds"])), *(_cell(g, c) for c in shown)])
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(lines)
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seeds", *(f"{c}_{stat}" for c in shown for stat in ("mean", "std"))])
        for g in groups:
            writer.writerow(
                [g["method"], len(g["seeds"]), *(g[stat].get(c, "") for c in shown for stat in ("mean", "std"))]
            )
    bar_chart(groups, out / "acc1_vs_method.png")
    return text


def bar_chart(groups: list[dict[str, Any]], path: Path) -> None:
    """Two panels (kNN, linear probe): per method the trained encoder against the best random init, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g["method"].replace("_synthetic", "") for g in groups]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(groups) + 1.6), sharey=True)
    for ax, (metric, title) in zip(axes, (("knn", "kNN top-1 (%)"), ("probe", "linear probe top-1 (%)"))):
        for i, (key, label) in enumerate(((metric, "pre-trained"), (f"{metric}_random", "best random init"))):
            means = [g["mean"].get(key, float("nan")) for g in groups]
            stds = [g["std"].get(key, 0.0) for g in groups]
            ax.barh([y + i * 0.4 for y in range(len(groups))], means, 0.4, xerr=stds, capsize=3, label=label)
        ax.set_yticks([y + 0.2 for y in range(len(groups))], names)
        ax.set_xlabel(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2)  # below the panels, over no bar
    counts = sorted({len(g["seeds"]) for g in groups})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig.suptitle(
        f"MIM methods under one protocol: pre-trained vs random init (mean ± std over {seeds} seeds per method)"
    )
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the compare_methods sweep folder")
    parser.add_argument("--also", type=Path, action="append", default=[], help="a further sweep folder (more seeds)")
    parser.add_argument("--out", type=Path, default=None, help="table folder (default: <sweep>/report)")
    parser.add_argument("--transfer", action="store_true", help="also run the linear-probe and fine-tune recipes")
    parser.add_argument("--protocol", type=Path, default=HERE / "transfer.yaml", help="transfer recipes + overrides")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the representation check")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every transfer run (after --)")
    args = parser.parse_intermixed_args(argv)  # "SWEEP --out DIR -- OVERRIDES": options between the positionals
    protocol = OmegaConf.load(args.protocol)
    rows = []
    for job in [job for sweep in (args.sweep, *args.also) for job in pretrain_jobs(sweep)]:
        name = OmegaConf.load(job / ".hydra" / "config.yaml").name
        runs = {}
        if args.transfer:
            if name not in protocol.recipes:
                raise KeyError(
                    f"{args.protocol}: no transfer recipes for {name!r} (job {job.name}); add them under recipes"
                )
            runs = {
                kind: transfer(job, kind, protocol.recipes[name][kind], list(protocol.overrides), args.overrides)
                for kind in TRANSFERS
            }
        rows.append(row(job, runs, representation(job, args.threads)))
    print(write_table(by_method(rows), args.out or args.sweep / "report"))


if __name__ == "__main__":
    main()
