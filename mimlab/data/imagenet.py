"""ImageNet-style LightningDataModule: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from mimlab.data.image_folder import CheckedImageFolder
from mimlab.data.resumable import ResumableSampler, SeededDataset
from mimlab.data.transforms import eval_transform, pretrain_transform


class ImageNetDataModule(L.LightningDataModule):
    """Reads an ImageNet-layout folder exactly like real ImageNet.

    Args:
        root: folder with ``train/`` and ``val/`` class folders.
        batch_size: per-device batch size.
        img_size: crop size; transforms default to the MAE pre-training / eval transforms at this size.
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader settings.
        on_corrupt: 'fail' (default, error names the file) or 'skip' undecodable images.
        seed: fixes the per-epoch order and every sample's augmentation (exactly resumable mid-epoch).
        train_transform, val_transform: optional callables replacing the defaults.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        img_size: int = 224,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
        on_corrupt: Literal["fail", "skip"] = "fail",
        drop_last: bool = True,
        train_transform: Callable | None = None,
        val_transform: Callable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1 (images per device), got {batch_size}")
        self.root = Path(root)
        self.batch_size = batch_size
        self.img_size = img_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.on_corrupt = on_corrupt
        self.drop_last = drop_last
        self.train_transform = train_transform or pretrain_transform(img_size)
        self.val_transform = val_transform or eval_transform(img_size)
        self.seed = seed
        self.train_set: CheckedImageFolder | None = None
        self.val_set: CheckedImageFolder | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed in it)

    @property
    def hint(self) -> str:
        return f"Set data.root to a folder with train/<class>/<image> and val/<class>/<image> (current: {self.root})."

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = CheckedImageFolder(self.root / "train", self.train_transform, self.on_corrupt, self.hint)
            self.val_set = CheckedImageFolder(self.root / "val", self.val_transform, self.on_corrupt, self.hint)

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.train_set.classes)

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: CheckedImageFolder, train: bool) -> DataLoader:
        num_replicas, rank = self._replicas()
        drop_last = train and self.drop_last and len(dataset) >= self.batch_size * num_replicas
        sampler = ResumableSampler(len(dataset), self.seed, shuffle=train, num_replicas=num_replicas, rank=rank,
                                   drop_last=drop_last)
        if train and self._resume is not None:
            sampler.resume_at(self._resume[0], self._resume[1] * self.batch_size)
        return DataLoader(
            SeededDataset(dataset),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def fingerprint(self) -> str:
        """A short hash of the root, class list and relative file list of both splits (identifies the data a run saw)."""
        self.setup()
        digest = hashlib.sha1(str(self.root.resolve()).encode())
        for dataset in (self.train_set, self.val_set):
            digest.update("\n".join(dataset.classes).encode())
            digest.update("\n".join(str(Path(p).relative_to(dataset.root)) for p, _ in dataset.samples).encode())
        return f"{len(self.train_set)}+{len(self.val_set)} images, sha1 {digest.hexdigest()[:16]}"

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the epoch and how many of its batches were trained on (mid-epoch resume)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume = (state["epoch"], state["batches_done"])
