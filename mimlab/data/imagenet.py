"""ImageNet-style LightningDataModule: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from mimlab.data.image_folder import CheckedImageFolder
from mimlab.data.transforms import eval_transform, pretrain_transform


class ImageNetDataModule(L.LightningDataModule):
    """Reads an ImageNet-layout folder exactly like real ImageNet.

    Args:
        root: folder with ``train/`` and ``val/`` class folders.
        batch_size: per-device batch size.
        img_size: crop size; transforms default to the MAE pre-training / eval transforms at this size.
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader settings.
        on_corrupt: 'fail' (default, error names the file) or 'skip' undecodable images.
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
        on_corrupt: str = "fail",
        drop_last: bool = True,
        train_transform: Callable | None = None,
        val_transform: Callable | None = None,
    ) -> None:
        super().__init__()
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
        self.train_set: CheckedImageFolder | None = None
        self.val_set: CheckedImageFolder | None = None

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

    def _loader(self, dataset: CheckedImageFolder, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
