"""Reconstruction panels: original | masked | reconstruction | reconstruction with visible patches pasted back.

Saved as PNG under ``<run>/reconstructions/step_XXXXXXX.png`` and logged to wandb when a WandbLogger is attached.
Works for any pre-training composition whose target maps predictions to pixels (``target.to_image``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image

from mimlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimlab.tasks.pretrain import MaskedPretraining


def _denormalise(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def reconstruction_grid(images: Tensor, mask: Tensor, pred: Tensor) -> Tensor:
    """(N,3,H,W) normalised images, (N,1,H,W) pixel mask (1 = masked), (N,3,H,W) prediction -> (3, H', W') grid.

    Rows are samples; columns are original, masked input (masked area grey), reconstruction, and reconstruction
    with the visible pixels pasted back.
    """
    original = _denormalise(images)
    recon = _denormalise(pred)
    masked = original * (1 - mask) + 0.5 * mask
    pasted = original * (1 - mask) + recon * mask
    columns = torch.stack([original, masked, recon, pasted], dim=1)  # (N, 4, 3, H, W)
    return make_grid(columns.flatten(0, 1), nrow=4, padding=2, pad_value=1.0)


def evenly_spaced_images(dataset, count: int) -> Tensor:
    """(count, C, H, W): ``count`` images spread evenly over ``dataset`` (the same ones every call)."""
    step = max(len(dataset) // count, 1)
    return torch.stack([dataset[i * step][0] for i in range(min(count, len(dataset)))])


class ReconstructionPanel(L.Callback):
    """Every ``every_n_steps`` training steps (and at the end of fitting) render ``num_images`` fixed validation images;
    ``last_path`` is the newest picture, reported as ``picture``."""

    picture = "reconstruction_png"

    def __init__(self, every_n_steps: int = 200, num_images: int = 8, dirname: str = "reconstructions") -> None:
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.dirname = dirname
        self.images: Tensor | None = None
        self.last_path: Path | None = None

    def _fixed_images(self, trainer: L.Trainer) -> Tensor:
        if self.images is None:
            self.images = evenly_spaced_images(trainer.datamodule.val_set, self.num_images)  # type: ignore[attr-defined]
        return self.images

    @rank_zero_only
    def render(self, trainer: L.Trainer, pl_module: MaskedPretraining) -> Path | None:
        if not pl_module.target.pixel_view:
            return None
        images = self._fixed_images(trainer).to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module.reconstruct(images)
        pl_module.train(was_training)
        grid = reconstruction_grid(images.float(), out["mask"].float(), out["pred"].float()).cpu()
        folder = Path(trainer.default_root_dir) / self.dirname
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{trainer.global_step:07d}.png"
        save_image(grid, path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "reconstructions",
                    [grid],
                    step=trainer.global_step,
                    caption=["original | masked | reconstruction | reconstruction + visible"],
                )
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.render(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.render(trainer, pl_module)
