"""Linear probe + fine-tune every pre-training job of a ``compare_methods`` sweep, then one table and plot.

    python -m mimlab.train -m +sweep=compare_methods
    python experiments/compare_methods/compare.py outputs/sweeps/compare_methods/<time> [--out DIR] [-- OVERRIDES]

For each job ``<sweep>/<n>_experiment=<recipe>`` (its ``checkpoints/last.ckpt``), the transfer recipes of
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
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from mimlab.report import markdown, read_metrics
from mimlab.train import CONFIG_DIR

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRANSFERS = ("linprobe", "finetune")
COLUMNS = ("params_M", "knn/acc1", "linprobe/acc1", "finetune/acc1", "img_per_s", "gflops_per_img", "pflops")


def pretrain_jobs(sweep: Path) -> list[Path]:
    """The sweep's job folders (``<n>_...`` with ``.hydra/config.yaml``), in job order."""
    jobs = [p for p in sweep.iterdir() if (p / ".hydra" / "config.yaml").exists() and p.name.split("_")[0].isdigit()]
    if not jobs:
        raise FileNotFoundError(f"{sweep}: no sweep job folders (<n>_.../.hydra/config.yaml); run the sweep first")
    return sorted(jobs, key=lambda p: int(p.name.split("_")[0]))


def hydra_value(value: Any) -> str:
    """A YAML value as a Hydra override value (strings quoted, dicts/lists in Hydra's grammar)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def encoder_overrides(job: Path) -> list[str]:
    """``model/backbone=<group>`` of the job plus ``++model.backbone.<key>=<value>`` for every key its recipe changed or added."""
    choice = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.choices["model/backbone"]
    trained = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml").model.backbone)
    default = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / "backbone" / f"{choice}.yaml"))
    changed = {k: v for k, v in trained.items() if default.get(k, object()) != v}  # type: ignore[union-attr]
    return [f"model/backbone={choice}", *(f"++model.backbone.{k}={hydra_value(v)}" for k, v in changed.items())]


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


def row(job: Path, runs: dict[str, Path]) -> dict[str, Any]:
    """One table row: the job's method name and the COLUMNS figures."""
    pre = read_metrics(job)
    batch = OmegaConf.load(job / ".hydra" / "config.yaml").data.batch_size
    gflops = pre.get("perf/train_gflops_per_img")
    steps = pre.get("step")
    metrics = {
        "params_M": encoder_params(job),
        "knn/acc1": pre.get("knn/acc1"),
        **{f"{kind}/acc1": read_metrics(run).get("val/acc1") for kind, run in runs.items()},
        "img_per_s": read_metrics(job, "median").get("train/device/samples_per_sec"),  # ThroughputMonitor, median
        "gflops_per_img": gflops,
        "pflops": gflops * (steps + 1) * batch / 1e6 if gflops is not None and steps is not None else None,
    }
    name = OmegaConf.load(job / ".hydra" / "config.yaml").name
    return {"run": job, "overrides": {"method": name}, "metrics": {k: v for k, v in metrics.items() if v is not None}}


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """``results.md``, ``results.csv`` and ``acc1_vs_method.png`` in ``out``; returns the markdown."""
    lines = [["method", *COLUMNS]]
    for r in rows:
        values = [r["metrics"].get(c) for c in COLUMNS]
        lines.append([r["overrides"]["method"], *("–" if v is None else f"{v:.4g}" for v in values)])
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(lines)
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows(lines)
    metrics = [m for m in ("knn/acc1", "linprobe/acc1", "finetune/acc1") if any(m in r["metrics"] for r in rows)]
    if metrics:
        bar_chart(rows, metrics, out / "acc1_vs_method.png")
    return text


def bar_chart(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    """Grouped horizontal bars: one group per method, one bar per top-1 metric (a missing value is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["overrides"]["method"].removesuffix("_synthetic") for r in rows]
    height = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.2))
    for i, metric in enumerate(metrics):
        values = [r["metrics"].get(metric, float("nan")) for r in rows]
        ax.barh([y + i * height for y in range(len(rows))], values, height, label=metric)
    ax.set_yticks([y + height * (len(metrics) - 1) / 2 for y in range(len(rows))], names)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 (%)")
    ax.set_title("MIM methods, one protocol (embedded data, 64 px, 10 epochs)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(metrics))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the compare_methods sweep folder")
    parser.add_argument("--out", type=Path, default=None, help="table folder (default: <sweep>/report)")
    parser.add_argument("--protocol", type=Path, default=HERE / "transfer.yaml", help="transfer recipes + overrides")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every transfer run (after --)")
    args = parser.parse_intermixed_args(argv)  # "SWEEP --out DIR -- OVERRIDES": options between the positionals
    protocol = OmegaConf.load(args.protocol)
    rows = []
    for job in pretrain_jobs(args.sweep):
        name = OmegaConf.load(job / ".hydra" / "config.yaml").name
        if name not in protocol.recipes:
            raise KeyError(
                f"{args.protocol}: no transfer recipes for {name!r} (job {job.name}); add them under recipes"
            )
        runs = {
            kind: transfer(job, kind, protocol.recipes[name][kind], list(protocol.overrides), args.overrides)
            for kind in TRANSFERS
        }
        rows.append(row(job, runs))
    print(write_table(rows, args.out or args.sweep / "report"))


if __name__ == "__main__":
    main()
