"""What the bench times: a recipe composed like ``python -m mimlab.train`` would, its task module instantiated."""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from mimlab.tasks.finetune import FineTuning
from mimlab.tasks.pretrain import MaskedPretraining
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


def loader_batch(module: L.LightningModule, images: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
    """The batch the training step gets from the real loader: (images, labels), and for pre-training the masks its
    workers draw (a :class:`~mimlab.masking.MaskSet` on the images' device); for fine-tuning with Mixup/CutMix the mixed
    images and soft targets (the DataModule mixes them after the transfer, outside the step). So a timed or compiled
    step does exactly the work it does in training."""
    if isinstance(module, MaskedPretraining):
        return images, labels, module.make_mask(images.cpu(), 0).to(images.device)
    if isinstance(module, FineTuning) and module.mixup is not None:  # mixed before the step, as the DataModule does
        return tuple(module.mix_batch((images, labels)))
    return images, labels


def mask_timing(module: L.LightningModule, batch_size: int, img_size: int, repeats: int = 5) -> dict[str, Any] | None:
    """Host time of a pre-training batch's masks (ms, median of ``repeats``): ``worker_ms`` drawing them for
    ``batch_size`` images (what one loader worker spends per batch, off the training step), ``step_ms`` what the step
    itself spends on them once they come with the batch. None for a module that draws no masks."""
    if not isinstance(module, MaskedPretraining):
        return None
    images = torch.empty(batch_size, 3, img_size, img_size)
    masks = module.make_mask(images, 0)
    batch = (images, torch.zeros(batch_size, dtype=torch.long), masks)

    def median_ms(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)

    return {
        "generator": repr(module.masking),
        "per_image": type(module.masking).per_image,
        "batch": batch_size,
        "worker_ms": median_ms(lambda: module.make_mask(images, 0)),
        "step_ms": median_ms(lambda: module.batch_masks(batch, 0)),
    }


def quiet_step(module: L.LightningModule, batch: Any, index: int) -> Tensor:
    """``module.training_step(batch, index)``'s loss, outside a Trainer (its ``self.log`` warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = module.training_step(batch, index)
    return out["loss"] if isinstance(out, dict) else out  # type: ignore[return-value]
