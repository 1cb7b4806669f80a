"""Gather run folders (one run, a sweep, or all of ``outputs/``) into a markdown table, a CSV and a plot.

    python -m mimlab.report outputs/sweeps/mae_mask_ratio/2026-11-25_22-21-40 --x masking.ratio --y knn/acc1,val/loss
    python -m mimlab.report outputs/ --out experiments/my_study          # every run found below outputs/

A run folder is any folder with ``.hydra/config.yaml``; its varying settings come from ``.hydra/overrides.yaml`` (keys
whose values differ between the runs), its numbers from ``csv/metrics.csv`` (the last logged value of each metric, or
``--agg max/min``). Writes ``results.md``, ``results.csv`` and ``<y>_vs_<x>.png`` to ``--out`` (default: the first path).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRICS = ("knn/acc1", "val/loss", "train/loss_epoch")
_LOCATION_KEYS = ("paths.", "hydra.", "data.root", "ckpt_path", "sweep", "experiment", "logger", "hardware")


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Every folder at or below ``paths`` holding ``.hydra/config.yaml`` (sorted; sweep jobs in job order)."""
    runs: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(
                f"mimlab.report: {path} does not exist; pass a run folder, a sweep folder or outputs/"
            )
        runs.update(p.parent.parent for p in path.glob("**/.hydra/config.yaml"))
    if not runs:
        raise FileNotFoundError(
            f"mimlab.report: no run folders (with .hydra/config.yaml) below {', '.join(map(str, paths))}"
        )

    def order(p: Path) -> tuple:
        head = p.name.split("_", 1)[0]
        return (str(p.parent), int(head) if head.isdigit() else math.inf, p.name)

    return sorted(runs, key=order)


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_metrics(run: Path, agg: str = "last") -> dict[str, float]:
    """Each column of ``csv/metrics.csv`` reduced to one number: its last logged value (or its max/min/median)."""
    path = run / "csv" / "metrics.csv"
    if not path.exists():
        return {}
    columns: dict[str, list[float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None):
                    columns.setdefault(key, []).append(float(value))
    reduce = {"last": lambda v: v[-1], "max": max, "min": min, "median": statistics.median}[agg]
    return {key: reduce(values) for key, values in columns.items()}  # type: ignore[operator]


def read_overrides(run: Path) -> dict[str, Any]:
    """``.hydra/overrides.yaml`` as {key: value} (``+``/``~`` prefixes dropped)."""
    path = run / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = yaml.safe_load(value) if value else None
    return out


def gather(runs: list[Path], agg: str = "last") -> list[dict[str, Any]]:
    """One row per run: ``{"run", "overrides": {...}, "metrics": {...}}``."""
    return [{"run": run, "overrides": read_overrides(run), "metrics": read_metrics(run, agg)} for run in runs]


def varying_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between rows (or all override keys for a single run), in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["overrides"] if k not in keys and not k.startswith(_LOCATION_KEYS)]
    if len(rows) == 1:
        return keys
    return [k for k in keys if len({repr(r["overrides"].get(k)) for r in rows}) > 1]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def table(rows: list[dict[str, Any]], keys: list[str], metrics: list[str], root: Path | None = None) -> list[list[str]]:
    """Header + one line per run: run folder, the varying keys, the metrics and the number of steps."""
    header = ["run", *keys, *metrics, "steps"]
    lines = [header]
    for row in rows:
        run = row["run"]
        name = str(run.relative_to(root)) if root is not None and run.is_relative_to(root) else run.name
        head = name.split("_", 1)[0]
        name = f"job {head}" if head.isdigit() and "/" not in name else name  # sweep jobs: the keys say the rest
        steps = row["metrics"].get("step")
        lines.append(
            [
                name or ".",
                *(_fmt(row["overrides"].get(k)) for k in keys),
                *(_fmt(row["metrics"].get(m)) for m in metrics),
                _fmt(int(steps) + 1 if steps is not None else None),
            ]
        )
    return lines


def markdown(lines: list[list[str]]) -> str:
    head, *body = lines
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(out) + "\n"


def plot(
    rows: list[dict[str, Any]], x: str, metrics: list[str], path: Path, hue: str | None = None, title: str | None = None
) -> Path:
    """One panel per metric: metric against override ``x``, one line per value of ``hue``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["overrides"].get(hue) if hue else None, []).append(row)
    for ax, metric in zip(axes[0], metrics):
        for label, members in groups.items():
            points = sorted(
                (r["overrides"].get(x), r["metrics"][metric])
                for r in members
                if metric in r["metrics"] and r["overrides"].get(x) is not None
            )
            if not points:
                continue
            xs, ys = zip(*points)
            categorical = not all(isinstance(v, (int, float)) for v in xs)
            ax.plot(
                [str(v) for v in xs] if categorical else xs, ys, marker="o", label=f"{hue}={label}" if hue else None
            )
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if hue:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(
    paths: list[str | Path],
    out: str | Path | None = None,
    x: str | None = None,
    y: list[str] | None = None,
    hue: str | None = None,
    agg: str = "last",
    title: str | None = None,
) -> dict[str, Any]:
    """Build the table (and the plot when there is a numeric or categorical ``x``); returns paths and the markdown."""
    runs = find_runs(paths)
    rows = gather(runs, agg)
    keys = varying_keys(rows)
    keys = keys if x is None or x in keys else [x, *keys]  # e.g. --x experiment: a varying key kept out by default
    available = set().union(*(r["metrics"] for r in rows))
    metrics = y or [m for m in DEFAULT_METRICS if m in available]
    missing = [m for m in metrics if m not in available]
    if missing:
        raise KeyError(f"mimlab.report: metric(s) {missing} are in no csv/metrics.csv; available: {sorted(available)}")
    out_dir = Path(out) if out is not None else Path(paths[0])
    root = Path(paths[0]) if len(paths) == 1 else None
    text = markdown(table(rows, keys, metrics, root))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text)
    with open(out_dir / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows(table(rows, keys, metrics, root))
    result: dict[str, Any] = {
        "markdown": text,
        "table": out_dir / "results.md",
        "csv": out_dir / "results.csv",
        "runs": runs,
        "keys": keys,
        "metrics": metrics,
    }
    x = x or next((k for k in keys if k != hue), None)
    if x is not None and len(rows) > 1:
        hue = hue if hue is not None else next((k for k in keys if k != x), None)
        name = f"{metrics[0].replace('/', '_')}_vs_{x.replace('/', '_')}.png"
        result["plot"] = plot(rows, x, metrics, out_dir / name, hue, title)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mimlab.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders, sweep folders or outputs/ (searched recursively)")
    parser.add_argument("--x", help="override key on the x axis (default: the first varying key)")
    parser.add_argument("--y", help=f"comma-separated metrics (default: those of {', '.join(DEFAULT_METRICS)} present)")
    parser.add_argument("--hue", help="override key drawn as separate lines (default: the second varying key)")
    parser.add_argument(
        "--agg", default="last", choices=["last", "max", "min", "median"], help="how a metric column becomes one number"
    )
    parser.add_argument("--out", help="folder for results.md / results.csv / the plot (default: the first path)")
    parser.add_argument("--title", help="plot title")
    args = parser.parse_args(argv)
    result = report(args.paths, args.out, args.x, args.y.split(",") if args.y else None, args.hue, args.agg, args.title)
    print(result["markdown"])
    print(
        f"table: {result['table']}\ncsv:   {result['csv']}" + (f"\nplot:  {result['plot']}" if "plot" in result else "")
    )


if __name__ == "__main__":
    main()
