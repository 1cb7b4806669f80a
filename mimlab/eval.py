"""Evaluate a checkpoint: ``mimlab-eval ckpt=PATH [...]`` (or ``python -m mimlab.eval``).

Two checks, both with a progress bar, a result table and a JSON file:

* **As its task** (``mimlab-eval ckpt=<run>/checkpoints/last.ckpt [key=value ...] [hardware=ddp]``): rebuilds the run
  from the config stored in the checkpoint and runs ``Trainer.validate`` on its validation data: ``val/loss`` (+ kNN)
  of pre-training, top-1/top-5 of fine-tuning and linear probing, box/mask mAP of detection, mIoU of segmentation.
  Under DDP every rank validates its own disjoint block and the metrics are reduced, so 1 and N processes agree
  (as in training). ``key=value`` overrides the stored config (``data.root=/elsewhere``, ``data.batch_size=64``);
  ``hardware=``/``trainer=`` pick those groups afresh. Writes ``<run>/eval/<checkpoint stem>/metrics.json`` (and
  ``csv/``), or under ``out=``.
* **Representation** (``mimlab-eval ckpt=PATH features=FOLDER [img_size=...] [...]``): weighted kNN and a linear probe
  on the frozen pooled features of any mimlab checkpoint (pre-training, fine-tuning, probe), released file of a layout
  the loader reads (docs/checkpoints.md: MAE, ConvNeXt V2, SimMIM, MaskFeat, data2vec 2.0, I-JEPA; ``PATH::submodel``
  for one model of a file that holds several) or exported encoder (``mimlab-export`` output), on an ImageNet-layout
  folder, against the same architecture with random init (:mod:`mimlab.evaluation.representation`), on ``device=``
  (cuda when available). The readout is the one the method trains (``global_pool``; ``pool=cls|avg`` to choose).
  Writes ``out=`` (default ``<ckpt>.features.json``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FEATURE_OPTIONS = {
    "ckpt": "mimlab .ckpt, released file (docs/checkpoints.md; PATH::submodel), or a mimlab-export output (required)",
    "features": "ImageNet-layout folder (<root>/train/<class>/..., <root>/val/<class>/...): run the representation check",
    "img_size": "input size (default: the checkpoint's data.img_size, else the encoder's)",
    "crop_pct": "eval transform: resize to img_size / crop_pct, centre crop (default 0.875)",
    "pool": "cls | avg (default: the encoder's global_pool, the readout its pre-training trains)",
    "k": "kNN neighbours (default 20)",
    "temperature": "kNN vote temperature (default 0.07)",
    "probe_epochs": "linear-probe epochs on the cached features (default 100)",
    "baseline": "true (default): also evaluate the same architecture with random init; false: skip it",
    "seed": "seed of the random-init baseline and the probe (default 0)",
    "batch_size": "embedding batch size (default 256)",
    "num_workers": "embedding loader workers (default 0)",
    "device": "cuda | cpu: embeds, votes and trains the probe there (default cuda when available)",
    "threads": "torch CPU threads (default: torch's)",
    "out": "JSON result file (default <ckpt>.features.json, <ckpt>.<submodel>.features.json)",
}
TASK_OPTIONS = {
    "ckpt": "a mimlab .ckpt of any task (required)",
    "out": "folder for metrics.json and the CSV log (default <run>/eval/<checkpoint stem>)",
    "<group>=<option>": "hardware=ddp|gpu|cpu, trainer=default: pick these groups afresh",
    "<key>=<value>": "override a key of the stored config (data.root=..., data.batch_size=...); +key= adds, ~key drops",
}
USAGE = "mimlab-eval ckpt=PATH [key=value ...]   |   mimlab-eval ckpt=PATH features=FOLDER [options]"


# ------------------------------------------------------------------------------------------------ representation
class PooledEncoder(nn.Module):
    """``images (N, C, H, W) -> (N, D)``: a mimlab backbone's readout (``pool``) or an exported model's pre-logits."""

    def __init__(self, model: nn.Module, pool: str | None = None) -> None:
        super().__init__()
        self.model, self.pool = model, pool

    def forward(self, images: Tensor) -> Tensor:
        from mimlab.checkpoints.export import exported_features

        if hasattr(self.model, "forward_pooled"):
            return self.model.forward_pooled(images, self.pool)  # type: ignore[operator]
        if self.pool is not None:
            raise ValueError("pool= applies to mimlab encoders; an exported timm model uses its own global_pool")
        return exported_features(self.model, images)


def _encoders(ckpt: Path, pool: str | None, seed: int) -> tuple[PooledEncoder, Callable[[], PooledEncoder], dict]:
    """(trained encoder, random-init builder, description) of a checkpoint or an exported file; the description of a
    checkpoint has its file ``layout`` and the ``backbone`` config it was rebuilt with."""
    from mimlab.checkpoints.export import load_exported

    if ckpt.with_suffix(ckpt.suffix + ".json").is_file():
        spec = json.loads(ckpt.with_suffix(ckpt.suffix + ".json").read_text())
        model = load_exported(ckpt)
        size = (spec.get("kwargs") or {}).get("img_size") or (spec.get("mimlab_backbone") or {}).get("img_size")

        def fresh() -> PooledEncoder:
            torch.manual_seed(seed)
            return PooledEncoder(load_exported(ckpt, random_init=True), pool)

        name = spec.get("model_name") or spec["mimlab_backbone"]["_target_"]
        return PooledEncoder(model, pool), fresh, {"encoder": name, "format": "export", "img_size": size}
    from mimlab.checkpoints.encoder import checkpoint_encoder

    encoder = checkpoint_encoder(ckpt)
    size = (encoder.config.get("data") or {}).get("img_size") or encoder.node.get("img_size")
    info = {"encoder": encoder.node["_target_"], "format": "mimlab", "layout": encoder.layout, "img_size": size}
    info["backbone"] = encoder.node
    return PooledEncoder(encoder.backbone, pool), lambda: PooledEncoder(encoder.fresh(seed), pool), info


def representation_check(options: dict[str, str]) -> dict[str, Any]:
    """Run the kNN + linear-probe check (``features=``); returns (and writes) the result record."""
    from rich.console import Console
    from rich.table import Table

    from mimlab.checkpoints.load import split_submodel
    from mimlab.evaluation.representation import Protocol, evaluate_encoders

    ckpt, seed = Path(options["ckpt"]), int(options.get("seed", 0))
    file, submodel = split_submodel(options["ckpt"])
    if "threads" in options:
        torch.set_num_threads(int(options["threads"]))
    pool = options.get("pool")
    trained, fresh, info = _encoders(ckpt, pool, seed)
    protocol = Protocol(
        img_size=int(options.get("img_size") or info["img_size"] or 224),
        crop_pct=float(options.get("crop_pct", 224 / 256)),
        k=int(options.get("k", 20)),
        temperature=float(options.get("temperature", 0.07)),
        probe_epochs=int(options.get("probe_epochs", 100)),
        seed=seed,
        batch_size=int(options.get("batch_size", 256)),
        num_workers=int(options.get("num_workers", 0)),
        device=options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    encoders: dict[str, nn.Module] = {"trained": trained}
    if options.get("baseline", "true").lower() != "false":
        encoders["random init"] = fresh()
    started = time.time()
    results = evaluate_encoders(encoders, options["features"], protocol)
    record = {
        "checkpoint": str(ckpt),
        **info,
        "readout": pool or getattr(trained.model, "global_pool", None) or "the export's global_pool",
        "data": str(options["features"]),
        "protocol": asdict(protocol),
        "results": results,
        "seconds": round(time.time() - started, 1),
    }
    out = Path(options.get("out") or f"{file}{'.' + submodel if submodel else ''}.features.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    title = f"{ckpt.name}: {record['encoder']} ({record['readout']}), {protocol.img_size} px, {record['data']}"
    table = Table(title=title)
    for column in ("encoder", "kNN top-1 (%)", "linear probe top-1 (%)", "effective rank", "mean cosine"):
        table.add_column(column)
    for label, v in results.items():
        row = (
            f"{v['knn_top1']:.2f}",
            f"{v['probe_top1']:.2f}",
            f"{v['effective_rank']:.1f}",
            f"{v['mean_cosine']:.3f}",
        )
        table.add_row(label, *row)
    console = Console()
    console.print(table)
    console.print(f"written: {out}", highlight=False)
    return record


# ------------------------------------------------------------------------------------------------ task validation
def _eval_dir(ckpt: Path, out: str | None) -> Path:
    """Same folder on every DDP rank: rank 0 picks it and passes it to the processes it launches."""
    if os.environ.get("MIMLAB_EVAL_DIR") and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(os.environ["MIMLAB_EVAL_DIR"])
    if out:
        folder = Path(out)
    else:
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        folder = run / "eval" / f"{ckpt.stem}_{datetime.now():%Y-%m-%d_%H-%M-%S}"
    os.environ["MIMLAB_EVAL_DIR"] = str(folder)
    return folder


FRESH_GROUPS = ("hardware", "trainer", "logger")


def task_config(ckpt: Path, checkpoint: dict, overrides: list[str], output_dir: Path):
    """The checkpoint's stored config with ``hardware``/``trainer``/``logger``/``paths`` composed afresh (CSV logger by
    default), the overrides of those groups (``hardware=ddp``, ``hardware.devices=2``, ``+hardware.x=...``) applied by
    Hydra, and the other ``key=value`` overrides applied to the stored keys (an unknown key is an error)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mimlab.train import CONFIG_DIR
    from mimlab.utils.hydra_overrides import hydra_value

    stored = ((checkpoint.get("mimlab") or {}).get("config")) or None
    if not stored:
        raise SystemExit(
            f"{ckpt} carries no mimlab config (checkpoint['mimlab']['config']): it is not a mimlab run's checkpoint. "
            "For any encoder file use the representation check: mimlab-eval ckpt=... features=<folder>"
        )
    fresh_overrides = [o for o in overrides if _group_of(o) in FRESH_GROUPS]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        # quoted: a sweep job's folder (0_experiment=mae,seed=0) has "=" and ","
        fresh = compose(
            "train", overrides=["logger=csv", *fresh_overrides, f"paths.output_dir={hydra_value(str(output_dir))}"]
        )
    cfg = OmegaConf.create(stored)
    for group in (*FRESH_GROUPS, "paths"):
        cfg[group] = fresh[group]
    if "pretrained" in cfg.task:
        cfg.task.pretrained = None  # the weights come from the checkpoint itself
    for override in (o for o in overrides if o not in fresh_overrides):
        key, _, value = override.lstrip("+~").partition("=")
        known = OmegaConf.select(cfg, key, default="<missing>") != "<missing>"
        if not known and not override.startswith("+"):
            raise SystemExit(f"unknown config key {key!r} in {override!r}: the checkpoint's config has no such key")
        if override.startswith("~"):
            parent, _, leaf = key.rpartition(".")
            (OmegaConf.select(cfg, parent) if parent else cfg).pop(leaf)
        else:
            OmegaConf.update(cfg, key, _yaml(value), merge=True, force_add=True)
    return cfg


def _no_random_init_warning(record: logging.LogRecord) -> bool:
    """Drops a task's "no `pretrained` checkpoint given" warning: a validated checkpoint brings its own weights."""
    return "no `pretrained` checkpoint" not in record.getMessage()


def _group_of(override: str) -> str:
    """The top-level config group an override addresses (``+hardware.strategy.x=1`` -> ``hardware``)."""
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0]


def _yaml(value: str) -> Any:
    import yaml

    return yaml.safe_load(value) if value else value


def validate_checkpoint(ckpt: Path, overrides: list[str], out: str | None = None) -> dict[str, float]:
    """``Trainer.validate`` of ``ckpt`` as the task it came from; returns (and writes, on rank 0) the metrics."""
    import lightning as L
    from rich.console import Console
    from rich.table import Column, Table

    from mimlab.checkpoints.files import read_checkpoint
    from mimlab.train import build

    output_dir = _eval_dir(ckpt, out)
    checkpoint = read_checkpoint(ckpt)
    cfg = task_config(ckpt, checkpoint, overrides, output_dir)
    L.seed_everything(cfg.seed, workers=True)
    tasks_log = logging.getLogger("mimlab.tasks.finetune")  # fine-tuning and linear probing warn there
    tasks_log.addFilter(_no_random_init_warning)  # the weights come from ckpt, not from task.pretrained
    try:
        datamodule, module, trainer = build(cfg)
    finally:
        tasks_log.removeFilter(_no_random_init_warning)
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False)
    metrics = {k: float(v) for k, v in results[0].items()}
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        task, step = cfg.task._target_.rsplit(".", 1)[-1], checkpoint.get("global_step")
        record = {"checkpoint": str(ckpt), "task": task, "step": step, "processes": trainer.world_size}
        (output_dir / "metrics.json").write_text(json.dumps({**record, "metrics": metrics}, indent=2))
        table = Table("metric", Column("value", justify="right"), title=f"{task}, step {step}")
        for key in sorted(metrics):
            table.add_row(key, f"{metrics[key]:.4f}")
        console = Console(soft_wrap=True)
        console.print(f"{ckpt} on {cfg.data.root} ({trainer.world_size} process(es))", highlight=False)
        console.print(table)
        console.print(f"written: {output_dir / 'metrics.json'}", highlight=False)
    return metrics


def _help() -> str:
    width = max(map(len, [*FEATURE_OPTIONS, *TASK_OPTIONS]))
    lines = [f"usage: {USAGE}", "", __doc__ or "", "as its task:"]
    lines += [f"  {key:<{width}}  {text}" for key, text in TASK_OPTIONS.items()]
    lines += ["", "representation (features=FOLDER):"]
    lines += [f"  {key:<{width}}  {text}" for key, text in FEATURE_OPTIONS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(_help())
        return
    bare = [a for a in argv if "=" not in a and not a.startswith("~")]
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if bare or "ckpt" not in args:
        named = f" (not key=value: {', '.join(bare)})" if bare else ""
        raise SystemExit(f"usage: {USAGE}{named}; --help lists the options")
    from mimlab.checkpoints.load import split_submodel

    ckpt = Path(args["ckpt"])
    file, submodel = split_submodel(args["ckpt"])
    if not Path(file).is_file():
        raise SystemExit(f"ckpt={file}: no such file" + (" (it is a folder)" if Path(file).is_dir() else ""))
    if submodel and "features" not in args:
        raise SystemExit(f"ckpt={ckpt}: a ::sub-model is read by the representation check (add features=FOLDER)")
    if "features" in args:
        unknown = sorted(set(args) - set(FEATURE_OPTIONS))
        if unknown:
            raise SystemExit(f"unknown option(s) {', '.join(unknown)} for the representation check; --help lists them")
        representation_check(args)
    else:
        overrides = [a for a in argv if a.split("=", 1)[0] not in ("ckpt", "out")]
        validate_checkpoint(ckpt, overrides, args.get("out"))


if __name__ == "__main__":
    main()
