"""Our ImageNet train loader side by side with the official MAE loader, on the same folder, workers and batch.

The official loader (facebookresearch/mae ``main_pretrain.py``) is torchvision ``ImageFolder`` with
``RandomResizedCrop(size, scale=(0.2, 1.0), bicubic) + RandomHorizontalFlip + ToTensor + Normalize`` and a shuffled
``DataLoader``. Ours is :class:`mimlab.data.imagenet.ImageNetDataModule`'s train loader (seeded per-sample augmentation,
resumable order, corrupt-file handling), timed with its ``on_after_batch_transfer`` (the per-batch normalisation),
so both sides deliver normalised float batches. The two alternate for ``rounds`` rounds (A, B, A, B, ...) so a change in the
machine's load hits both; each round starts fresh loaders, skips their first batch (worker start-up) and times
``batches`` batches. Without a folder, JPEGs with ImageNet's typical sizes are generated first.

Where ours is faster (per core, same workers): each sample's augmentation seed goes to torch's CPU generator alone
(``torch.manual_seed`` also queues a lazy CUDA seeding call with a formatted stack trace in CUDA builds, about 1 ms a
sample), and the workers hand over uint8 crops, leaving the float conversion and normalisation to the training
device, where they cost nothing measurable.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from torchvision import datasets, transforms as T

from mimlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# (width, height) of the most common ILSVRC-2012 image sizes; generated JPEGs cycle through them.
IMAGENET_SIZES = ((500, 375), (500, 333), (375, 500), (500, 500), (400, 300), (333, 500), (500, 400))


def official_mae_loader(root: Path, img_size: int, batch_size: int, workers: int) -> DataLoader:
    transform = T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "train"), transform=transform)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=False,
        drop_last=True,
        persistent_workers=False,
    )


def mimlab_loader(root: Path, img_size: int, batch_size: int, workers: int) -> Iterable:
    """Our train loader's batches as the model gets them (``on_after_batch_transfer`` included: it normalises)."""
    from mimlab.data.imagenet import ImageNetDataModule

    datamodule = ImageNetDataModule(
        str(root),
        batch_size=batch_size,
        img_size=img_size,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=False,
    )
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    return _Transferred(loader, datamodule)


class _Transferred:
    """Iterates ``loader`` and hands each batch through ``datamodule.on_after_batch_transfer`` (CPU device)."""

    def __init__(self, loader: DataLoader, datamodule) -> None:
        self.loader, self.datamodule = loader, datamodule

    def __iter__(self):
        return (self.datamodule.on_after_batch_transfer(batch, 0) for batch in self.loader)


def _rate(loader: Iterable, batches: int) -> float:
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


def write_imagenet_like_jpegs(
    root: Path, per_class: int = 60, classes: int = 4, seed: int = 0, val_per_class: int = 2
) -> Path:
    """``root/{train,val}/<class>/*.JPEG`` at ImageNet's common sizes (the synthetic shapes, quality 90); the small
    ``val/`` split is there because the ImageNet DataModule checks the whole layout before it reads ``train/``."""
    from mimlab.data.synthetic import write_image_folder

    write_image_folder(
        root,
        {"train": per_class, "val": val_per_class},
        classes=classes,
        seed=seed,
        min_size=120,
        max_size=240,
        sizes=IMAGENET_SIZES,
    )
    return root


def time_data_option(option: str, root: str | Path, batch: int, workers: int) -> dict[str, Any]:
    """img/s of ``data=<option>``'s train loader over ``root`` (an ImageNet-layout folder) as the model would get it:
    loader workers, host-to-device copy and ``on_after_batch_transfer``, on the GPU when there is one. Two untimed
    batches, then three windows of a third of the remaining batches each."""
    import torch
    from hydra.utils import instantiate

    from mimlab.bench.timing import time_loader
    from mimlab.bench.workloads import compose_train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = compose_train(
        [
            f"data={option}",
            f"data.root={root}",
            f"data.batch_size={batch}",
            f"hardware={'gpu' if device.type == 'cuda' else 'cpu'}",
            f"hardware.num_workers={workers}",
            "logger=none",
        ]
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    steps = max(1, (len(datamodule.train_dataloader()) - 2) // 3)
    figures = time_loader(datamodule, steps, 2, 3, device, batch)
    return {"option": option, "workers": workers, "batch": batch, "device": str(device), **figures}


def compare_loaders(
    root: Path, img_size: int = 224, batch_size: int = 64, workers: int = 2, batches: int = 12, rounds: int = 3
) -> dict[str, Any]:
    """A/B/C rounds of img/s: the official MAE loader (float batches normalised in its workers), ours as the model gets
    it on this CPU (uint8 batches normalised by ``on_after_batch_transfer`` in the main process), and ours' workers
    alone (what a GPU host's CPUs pay: the normalisation then runs on the GPU). Ratios are ours / official per round."""
    official, ours, workers_only = [], [], []
    for _ in range(rounds):
        official.append(_rate(official_mae_loader(root, img_size, batch_size, workers), batches))
        loader = mimlab_loader(root, img_size, batch_size, workers)
        ours.append(_rate(loader, batches))
        workers_only.append(_rate(loader.loader, batches))  # type: ignore[attr-defined]
    ratios = [a / b for a, b in zip(ours, official)]
    ratios_workers = [a / b for a, b in zip(workers_only, official)]
    return {
        "root": str(root),
        "workers": workers,
        "batch": batch_size,
        "img_size": img_size,
        "batches": batches,
        "official_img_s": official,
        "mimlab_img_s": ours,
        "mimlab_workers_img_s": workers_only,
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_workers_per_round": ratios_workers,
        "ratio_workers_median": statistics.median(ratios_workers),
    }
