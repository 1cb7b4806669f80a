"""Released (and mimlab) checkpoints under one protocol: kNN and a linear probe on frozen features, each against the
same architecture with random init, optionally one fine-tuning recipe for all; one table.

    python experiments/compare_released/compare.py --data FOLDER [--out DIR] [--img-size N] [--probe-epochs E]
        [--seed S] [--threads T] [--device D] [--finetune RECIPE] CKPT [CKPT ...] [-- OVERRIDES]

``CKPT`` is any file ``mimlab-eval`` reads: a mimlab ``.ckpt``, a released file of a layout the loader reads
(docs/checkpoints.md), ``file::submodel`` for one model of a file that holds several (I-JEPA ``::encoder``); ``label=CKPT``
names its row (default: the file name). Per checkpoint, in ``OUT/<label>/``:

* ``representation.json``: mimlab-eval's representation check (:func:`mimlab.eval.representation_check`) on FOLDER's
  ``train/`` and ``val/`` at the checkpoint's own input size (``--img-size``: one size for all), cached;
* with ``--finetune RECIPE``: ``python -m mimlab.train experiment=RECIPE task.pretrained=CKPT`` with the encoder
  rebuilt as the representation check rebuilt it (the ``model/backbone`` group of its family plus every key of its
  config), ``data=imagenet data.root=FOLDER data.img_size=<size>``, ``seed`` and OVERRIDES; run folder
  ``OUT/<label>/finetune`` (not rerun once it has ``val/acc1``).

``OUT/results.md`` and ``OUT/results.csv`` hold one row per checkpoint: its layout, encoder, readout, input size,
parameters, kNN and probe top-1 of the checkpoint and of its random init, and the fine-tuning top-1 (last epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from mimlab.eval import representation_check
from mimlab.report import markdown, read_metrics
from mimlab.utils.hydra_overrides import hydra_value, node_overrides

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {  # backbone class -> (its conf/model/backbone group, overrides that fit a ViT fine-tuning recipe to it)
    "MaskedViT": ("vit_tiny_p8", []),
    "MaskTokenViT": ("mask_token_vit_tiny_p8", []),
    # ViT-only key of the recipe out; Swin keeps its final norm before the pooling, as SimMIM's Swin fine-tuning does
    "MaskTokenSwin": (
        "mask_token_swin_base_w6",
        ["~model.backbone.learnable_pos_embed", "task.drop_backbone_norm=false"],
    ),
}
COLUMNS = ("checkpoint", "layout", "encoder", "readout", "px", "params (M)", "kNN", "kNN random", "probe",
           "probe random", "fine-tune")  # fmt: skip


def parse_checkpoint(arg: str) -> tuple[str, str]:
    """``label=path[::submodel]`` or ``path[::submodel]`` -> (label, path)."""
    label, sep, path = arg.partition("=")
    if not sep:
        path = arg
        file, _, submodel = arg.partition("::")
        label = Path(file).name + (f"::{submodel}" if submodel else "")
    return label, path


def folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def backbone_overrides(node: dict[str, Any]) -> list[str]:
    """The encoder the representation check rebuilt, as ``model/backbone=<family group>`` + ``++model.backbone.*``
    (``img_size`` follows ``data.img_size``)."""
    cls = node["_target_"].rsplit(".", 1)[-1]
    if cls not in FAMILIES:
        raise ValueError(f"--finetune takes ViT and Swin encoders (FAMILIES); {cls} has no entry there")
    group, fit = FAMILIES[cls]
    group = "mask_token_beit_tiny_p8" if node.get("rel_pos_bias") else group
    keys = {k: v for k, v in node.items() if k != "img_size"}
    return [f"model/backbone={group}", *fit, *node_overrides("model.backbone", keys)]


def finetune(label: str, ckpt: str, record: dict[str, Any], args: argparse.Namespace) -> float | None:
    """Run (or reuse) the fine-tuning recipe from ``ckpt``; its last ``val/acc1`` (%, the EMA weights' when the
    recipe keeps a model EMA)."""
    out = args.out / folder_name(label) / "finetune"
    if "val/acc1" not in read_metrics(out):
        cmd = [
            sys.executable, "-m", "mimlab.train", f"experiment={args.finetune}", f"task.pretrained={hydra_value(ckpt)}",
            *backbone_overrides(record["backbone"]), "data=imagenet", f"data.root={hydra_value(str(args.data))}",
            f"data.img_size={record['protocol']['img_size']}", f"seed={args.seed}", "logger=csv", *args.overrides,
            f"hydra.run.dir={hydra_value(str(out))}",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return read_metrics(out).get("val/acc1")


def representation(label: str, ckpt: str, args: argparse.Namespace) -> dict[str, Any]:
    """mimlab-eval's representation check of ``ckpt`` (cached in ``OUT/<label>/representation.json``)."""
    out = args.out / folder_name(label) / "representation.json"
    if out.is_file():
        return json.loads(out.read_text())
    options = {"ckpt": ckpt, "features": str(args.data), "probe_epochs": str(args.probe_epochs), "seed": str(args.seed)}
    options |= {"out": str(out), **({"img_size": str(args.img_size)} if args.img_size else {})}
    options |= {"threads": str(args.threads)} if args.threads else {}
    options |= {"device": args.device} if args.device else {}
    return representation_check(options)


def params_m(node: dict[str, Any]) -> float:
    with torch.device("meta"):
        return sum(p.numel() for p in instantiate({**node, "_convert_": "all"}).parameters()) / 1e6


def row(label: str, record: dict[str, Any], finetuned: float | None) -> dict[str, Any]:
    trained, random = record["results"]["trained"], record["results"].get("random init", {})
    return {
        "checkpoint": label,
        "layout": record.get("layout", record["format"]),
        "encoder": record["encoder"].rsplit(".", 1)[-1],
        "readout": record["readout"],
        "px": record["protocol"]["img_size"],
        "params (M)": params_m(record["backbone"]) if "backbone" in record else None,
        "kNN": trained["knn_top1"],
        "kNN random": random.get("knn_top1"),
        "probe": trained["probe_top1"],
        "probe random": random.get("probe_top1"),
        "fine-tune": finetuned,
    }


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if column == "params (M)" else f"{value:.1f}" if isinstance(value, float) else str(value)


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """``results.md`` and ``results.csv`` in ``out``; returns the markdown."""
    shown = [c for c in COLUMNS if any(r[c] is not None for r in rows)]
    text = markdown([list(shown), *([_cell(r[c], c) for c in shown] for r in rows)])
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=shown, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="CKPT or label=CKPT (CKPT may end in ::submodel)")
    parser.add_argument("--data", type=Path, required=True, help="ImageNet-layout folder with train/ and val/")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare_released"), help="results folder")
    parser.add_argument("--img-size", type=int, default=None, help="one input size for all (default: each its own)")
    parser.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs on the cached features")
    parser.add_argument("--seed", type=int, default=0, help="random-init baseline, probe and fine-tuning seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the representation check")
    parser.add_argument("--device", default=None, help="cuda | cpu for the representation check (default: cuda if any)")
    parser.add_argument("--finetune", default=None, help="also run this fine-tuning experiment from each checkpoint")
    args = parser.parse_intermixed_args(argv[:split])
    args.overrides = argv[split + 1 :]  # after --: overrides for every fine-tuning run
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, ckpt in map(parse_checkpoint, args.checkpoints):
        record = representation(label, ckpt, args)
        rows.append(row(label, record, finetune(label, ckpt, record, args) if args.finetune else None))
    print(write_table(rows, args.out))


if __name__ == "__main__":
    main()
