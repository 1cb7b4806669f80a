"""The one entry point: ``python -m mimlab.train experiment=<recipe> [overrides]`` (Hydra; ``-m`` for sweeps).

Instantiates the DataModule, the task LightningModule, callbacks, loggers and the Trainer from the composed config,
fits, and prints where the checkpoints, logs and pictures went.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mimlab.callbacks.run_metadata import RunMetadata

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate (datamodule, module, trainer) from a composed config; nothing is read from disk yet."""
    torch.set_float32_matmul_precision(cfg.hardware.matmul_precision)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.method)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [RunMetadata(resolved)]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the composed experiment; returns the final metrics and the artefact paths."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    fit_module = torch.compile(module) if cfg.hardware.compile else module
    trainer.fit(fit_module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    artefacts = _artefacts(trainer)
    _print_summary(cfg, trainer, metrics, artefacts)
    return {"metrics": metrics, **artefacts}


def _artefacts(trainer: L.Trainer) -> dict[str, Any]:
    out: dict[str, Any] = {"run_dir": trainer.default_root_dir}
    ckpt = trainer.checkpoint_callback
    if ckpt is not None:
        out["last_checkpoint"] = ckpt.last_model_path or None
        out["best_checkpoint"] = ckpt.best_model_path or None
    for callback in trainer.callbacks:
        if getattr(callback, "last_path", None) is not None:
            out["reconstruction_png"] = str(callback.last_path)
    out["logs"] = [lg.log_dir if hasattr(lg, "log_dir") and lg.log_dir else lg.save_dir for lg in trainer.loggers]
    return out


@rank_zero_only
def _print_summary(cfg: DictConfig, trainer: L.Trainer, metrics: dict, artefacts: dict) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
    console.rule(f"mimlab run '{cfg.name}' finished after {trainer.global_step} steps")
    for key in ("train/loss_epoch", "val/loss"):
        if key in metrics:
            console.print(f"{key:>20}: {metrics[key]:.4f}")
    for key, value in artefacts.items():
        if value:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            console.print(f"{key.replace('_', ' '):>20}: {shown}", highlight=False)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = run(cfg)
    return result["metrics"].get("val/loss")


if __name__ == "__main__":
    main()
