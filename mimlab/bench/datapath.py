"""Our ImageNet train loader side by side with the official MAE loader, on the same folder, workers and batch.

The official loader (facebookresearch/mae ``main_pretrain.py``) is torchvision ``ImageFolder`` with
``RandomResizedCrop(size, scale=(0.2, 1.0), bicubic) + RandomHorizontalFlip + ToTensor + Normalize`` and a shuffled
``DataLoader``. Ours is :class:`mimlab.data.imagenet.ImageNetDataModule`'s train loader (seeded per-sample augmentation,
resumable order, corrupt-file handling). The two alternate for ``rounds`` rounds (A, B, A, B, ...) so a change in the
machine's load hits both; each round starts fresh loaders, skips their first batch (worker start-up) and times
``batches`` batches. Without a folder, JPEGs with ImageNet's typical sizes are generated first.
"""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from mimlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# (width, height) of the most common ILSVRC-2012 image sizes; generated JPEGs cycle through them.
IMAGENET_SIZES = ((500, 375), (500, 333), (375, 500), (500, 500), (400, 300), (333, 500), (500, 400))


def official_mae_loader(root: Path, img_size: int, batch_size: int, workers: int) -> DataLoader:
    transform = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(str(root / "train"), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=False,
                      drop_last=True, persistent_workers=False)


def mimlab_loader(root: Path, img_size: int, batch_size: int, workers: int) -> DataLoader:
    from mimlab.data.imagenet import ImageNetDataModule

    datamodule = ImageNetDataModule(str(root), batch_size=batch_size, img_size=img_size, num_workers=workers,
                                    pin_memory=False, persistent_workers=False)
    datamodule.setup("fit")
    return datamodule.train_dataloader()


def _rate(loader: DataLoader, batches: int) -> float:
    """img/s over ``batches`` batches after the first (worker start-up is not timed); the loader is cycled."""
    def forever():
        while True:
            yield from loader

    stream = forever()
    first = next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * len(first[0]) / (time.perf_counter() - start)


def write_imagenet_like_jpegs(root: Path, per_class: int = 60, classes: int = 4, seed: int = 0) -> Path:
    """``root/train/<class>/*.JPEG`` at ImageNet's common sizes (the synthetic shapes, quality 90)."""
    from mimlab.data.synthetic import render_image

    rng = random.Random(seed)
    for c in range(classes):
        folder = root / "train" / f"c{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = IMAGENET_SIZES[(c * per_class + i) % len(IMAGENET_SIZES)]
            render_image(c, rng, 120, 240).resize(size).save(folder / f"{i:05d}.JPEG", quality=90)
    return root


def compare_loaders(root: Path, img_size: int = 224, batch_size: int = 64, workers: int = 2, batches: int = 12,
                    rounds: int = 3) -> dict[str, Any]:
    """A/B/A/B img/s of ours vs the official MAE loader; ``ratio`` = ours / official per round and its median."""
    ours, official = [], []
    for _ in range(rounds):
        ours.append(_rate(mimlab_loader(root, img_size, batch_size, workers), batches))
        official.append(_rate(official_mae_loader(root, img_size, batch_size, workers), batches))
    ratios = [a / b for a, b in zip(ours, official)]
    return {"root": str(root), "workers": workers, "batch": batch_size, "img_size": img_size, "batches": batches,
            "mimlab_img_s": ours, "official_img_s": official, "ratio_per_round": ratios,
            "ratio_median": statistics.median(ratios), "mimlab_img_s_per_worker": statistics.median(ours) / max(workers, 1)}
