"""What the bench times: a recipe composed like ``python -m mimlab.train`` would, its task module instantiated."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from mimlab.train import CONFIG_DIR


def compose_train(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (run folder under the temp dir)."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tempfile.gettempdir()}/mimlab-bench", *overrides])


def data_overrides(cfg: DictConfig) -> list[str]:
    out = [f"data.batch_size={cfg.batch}", f"hardware.num_workers={cfg.workers}"]
    if cfg.data_root:
        if not any(o.startswith("data=") for o in cfg.overrides):
            out.append("data=imagenet")
        out.append(f"data.root={cfg.data_root}")
    return out


class ExperimentWorkload:
    """Any recipe: compose ``conf/experiment/<experiment>.yaml`` (+ ``overrides``) and instantiate its task module, so
    the bench times the real pre-training or fine-tuning LightningModule. ``tiny_overrides`` shrink it for the CPU mode."""

    def __init__(
        self, experiment: str, overrides: list[str] | None = None, tiny_overrides: list[str] | None = None
    ) -> None:
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
        overrides = [
            f"experiment={self.experiment}",
            f"hardware={hardware}",
            "logger=none",
            *self.overrides,  # type: ignore[misc]
            *(self.tiny_overrides if tiny else []),
            *data_overrides(cfg),
            *cfg.overrides,
        ]
        composed = compose_train(overrides)
        return instantiate(composed.task), composed


def quiet_step(module: L.LightningModule, batch: Any, index: int) -> Tensor:
    """``module.training_step(batch, index)``'s loss, outside a Trainer (its ``self.log`` warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = module.training_step(batch, index)
    return out["loss"] if isinstance(out, dict) else out  # type: ignore[return-value]
