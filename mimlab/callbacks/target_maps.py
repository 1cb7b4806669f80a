"""Teacher-target dashboards for feature targets (Img2Vec frozen teachers, iTPN CLIP / EMA teachers).

On fixed validation images, with nothing masked, the target's tokens are read and two things are recorded:
- **token diversity** ``1 − mean_{i≠k} cos(f_i, f_k)`` over the K tokens of each image, averaged over images
  (the Img2Vec §3.2 measure), logged as ``target/token_diversity[/<name>]`` and appended to
  ``<run>/target_maps/token_diversity.csv``;
- **similarity maps**: cosine similarity of the centre token with every token, drawn next to each image, saved as
  ``<run>/target_maps/step_XXXXXXX.png`` and logged to wandb.
Runs at the start of fitting (the frozen teacher's diversity) and every ``every_n_steps`` (EMA teachers move).
Only targets with weights (teachers) are drawn; pixel targets are left to the reconstruction panel. Target outputs
may be (N, K, C) tokens, (N, C, h, w) maps, or a dict of those (one entry per name).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from mimlab.analysis.token_diversity import as_tokens, token_diversity
from mimlab.callbacks.reconstruction import _denormalise, evenly_spaced_images
from mimlab.tasks.pretrain import MaskedPretraining


def similarity_maps(tokens: Tensor, query: int | None = None) -> Tensor:
    """(N, K, C) with K a square grid -> (N, 1, g, g) cosine similarity of token ``query`` (default: centre)."""
    n, k, _ = tokens.shape
    g = math.isqrt(k)
    if g * g != k:
        raise ValueError(f"{k} tokens do not form a square grid")
    query = (g // 2) * g + g // 2 if query is None else query
    x = F.normalize(tokens.float(), dim=-1)
    return (x @ x[:, query : query + 1].transpose(1, 2)).reshape(n, 1, g, g)


class TeacherTargetPanel(L.Callback):
    """Renders the panel (see module docstring); ``last_path`` is the newest picture, reported as ``picture``."""

    picture = "target_maps_png"

    def __init__(self, every_n_steps: int = 1000, num_images: int = 4, dirname: str = "target_maps") -> None:
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.dirname = dirname
        self.last_path: Path | None = None

    @staticmethod
    def _named_features(output) -> dict[str, Tensor]:
        if isinstance(output, Tensor):
            return {"": output}
        if isinstance(output, dict):
            return {k: v for k, v in output.items() if isinstance(v, Tensor) and v.ndim in (3, 4)}
        return {}

    @rank_zero_only
    @torch.no_grad()
    def render(self, trainer: L.Trainer, pl_module: MaskedPretraining) -> Path | None:
        target = pl_module.target
        if not target.from_teacher:
            return None  # pixel or HOG targets: no teacher features to map
        images = evenly_spaced_images(trainer.datamodule.val_set, self.num_images).to(pl_module.device)  # type: ignore[attr-defined]
        masks = pl_module.make_mask(images, 0)
        mask = torch.zeros_like(masks.mask[:: masks.clones])  # nothing masked, one row per image
        features = self._named_features(target(images, mask))
        if not features:
            return None
        folder = Path(trainer.default_root_dir) / self.dirname
        folder.mkdir(parents=True, exist_ok=True)
        metrics, columns = {}, [_denormalise(images.float()).cpu()]
        for name, value in features.items():
            tokens = as_tokens(value)
            metrics[f"target/token_diversity{'/' + name if name else ''}"] = float(token_diversity(tokens).mean())
            try:
                maps = similarity_maps(tokens).cpu()
            except ValueError:
                continue
            maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest").clamp(-1, 1)
            columns.append(((maps + 1) / 2).repeat(1, 3, 1, 1))
        self._append_csv(folder / "token_diversity.csv", trainer.global_step, metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        from torchvision.utils import make_grid, save_image

        grid = make_grid(torch.stack(columns, 1).flatten(0, 1), nrow=len(columns), padding=2, pad_value=1.0)
        path = folder / f"step_{trainer.global_step:07d}.png"
        save_image(grid, path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "target_maps",
                    [grid],
                    step=trainer.global_step,
                    caption=["image | centre-token cosine similarity per target (white = 1, black = -1)"],
                )
        return path

    @staticmethod
    def _append_csv(path: Path, step: int, metrics: dict[str, float]) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", *metrics])
            writer.writerow([step, *(f"{v:.6f}" for v in metrics.values())])

    def on_train_start(self, trainer, pl_module) -> None:
        self.render(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.render(trainer, pl_module)
