"""ImageNet-style LightningDataModule: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from mimlab.data.base import ResumableDataModule
from mimlab.data.image_folder import CheckedImageFolder
from mimlab.data.transforms import eval_transform, pretrain_transform


class ImageNetDataModule(ResumableDataModule):
    """Reads an ImageNet-layout folder exactly like real ImageNet (sharding, seeding and resume: the base class).

    Args:
        root: folder with ``train/`` and ``val/`` class folders. Labels follow the *training* class folders; a
            validation class folder is matched to the training one of the same name, and a validation class that
            training does not have is an error.
        img_size: crop size; transforms default to the MAE pre-training / eval transforms at this size.
        on_corrupt: 'fail' (default, error names the file) or 'skip' undecodable images.
        train_transform, val_transform: optional callables replacing the defaults.
        Others: see :class:`~mimlab.data.base.ResumableDataModule`.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        img_size: int = 224,
        on_corrupt: Literal["fail", "skip"] = "fail",
        train_transform: Callable | None = None,
        val_transform: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, batch_size=batch_size, **kwargs)
        self.img_size = img_size
        self.on_corrupt = on_corrupt
        self.train_transform = train_transform or pretrain_transform(img_size)
        self.val_transform = val_transform or eval_transform(img_size)

    @property
    def hint(self) -> str:
        return f"Set data.root to a folder with train/<class>/<image> and val/<class>/<image> (current: {self.root})."

    def build_datasets(self) -> tuple[CheckedImageFolder, CheckedImageFolder]:
        train = CheckedImageFolder(self.root / "train", self.train_transform, self.on_corrupt, self.hint)
        val = CheckedImageFolder(
            self.root / "val", self.val_transform, self.on_corrupt, self.hint, class_to_idx=train.class_to_idx
        )
        return train, val

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.train_set.classes)  # type: ignore[union-attr]

    def data_identity(self) -> tuple[str, Iterable[str]]:
        def lines():
            for dataset in (self.train_set, self.val_set):
                yield from dataset.classes
                yield from (str(Path(p).relative_to(dataset.root)) for p, _ in dataset.samples)

        return f"{len(self.train_set)} train + {len(self.val_set)} val images", lines()  # type: ignore[arg-type]
