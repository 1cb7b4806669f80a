"""ADE20K (MIT Scene Parsing, ``ADEChallengeData2016``) semantic segmentation: dataset, transforms, DataModule.

Layout::

    <root>/ADEChallengeData2016/images/{training,validation}/*.jpg
    <root>/ADEChallengeData2016/annotations/{training,validation}/*.png   (8-bit, values 0..150)

Labels use the standard *reduce-zero-label* convention (mmseg ``reduce_zero_label=True``): raw 0 ("other") becomes
ignore index 255 and raw 1..150 become classes 0..149. A raw 255 stays 255. Any other raw value is an error.

A training sample is ``(image, label)``: image (3, crop, crop) float, ImageNet-normalised; label (crop, crop) int64
in 0..149 ∪ {255}. A validation sample keeps the label at its original size; the image is resized (shorter side
``img_size``) and the model's logits are resized back to the label before scoring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from mimlab.data.base import ResumableDataModule
from mimlab.data.coco import read_rgb
from mimlab.data.generated import check_generated_root
from mimlab.data.synthetic_dense import ADE20K_OWN_DATA_HINT, write_ade20k
from mimlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MEAN_PIXEL

log = logging.getLogger(__name__)
IGNORE_INDEX = 255


def reduce_zero_label(raw: np.ndarray, num_classes: int = 150, source: str = "label") -> np.ndarray:
    """Raw ADE label (H, W) uint8 in 0..num_classes ∪ {255} → int64 train ids: 0 → 255, k → k-1, 255 → 255."""
    bad = (raw > num_classes) & (raw != IGNORE_INDEX)
    if bad.any():
        values = sorted(set(np.unique(raw[bad]).tolist()))
        raise ValueError(
            f"{source}: label values {values[:10]} are outside 0..{num_classes} (or {IGNORE_INDEX} = ignore). "
            f"ADE20K label PNGs must be 8-bit class indices, not colour-coded images."
        )
    out = raw.astype(np.int64) - 1
    out[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
    return out


class ADE20KSegmentation(Dataset):
    """Image/label pairs of one split, matched by file stem.

    Args:
        root: folder containing ``ADEChallengeData2016`` (or that folder itself).
        split: ``"training"`` or ``"validation"``.
        transforms: v2 callable ``(image, mask) -> (image, mask)``; applied to the label too when ``label_transforms``.
        transform_label: apply ``transforms`` to the label (train) or keep it at full size (val).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        transforms: Callable | None = None,
        transform_label: bool = True,
        num_classes: int = 150,
    ):
        root = Path(root)
        base = root if root.name == "ADEChallengeData2016" else root / "ADEChallengeData2016"
        self.image_dir, self.label_dir = base / "images" / split, base / "annotations" / split
        for d in (self.image_dir, self.label_dir):
            if not d.is_dir():
                raise FileNotFoundError(
                    f"ADE20K folder not found: {d}. Expected <root>/ADEChallengeData2016/"
                    f"{{images,annotations}}/{{training,validation}}; set data.root accordingly."
                )
        images = [p for p in self.image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
        self.images = sorted(p for p in images if p.is_file())  # a FIFO or device would block its reader
        if len(self.images) < len(images):
            odd = sorted(p.name for p in images if not p.is_file())
            log.warning("%s: %d entries are not regular files and are left out: %s", self.image_dir, len(odd), odd[:5])
        if not self.images:
            raise FileNotFoundError(f"No images in {self.image_dir}.")
        missing = [p.name for p in self.images if not (self.label_dir / f"{p.stem}.png").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) in {self.image_dir} have no label PNG in {self.label_dir}: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}."
            )
        self._check_label_sizes()
        self.transforms, self.transform_label, self.num_classes = transforms, transform_label, num_classes

    def _pair(self, index: int) -> tuple[Path, Path]:
        return self.images[index], self.label_dir / f"{self.images[index].stem}.png"

    def _check_sizes(self, index: int, image_hw: tuple[int, int], label_hw: tuple[int, int]) -> None:
        if tuple(image_hw) != tuple(label_hw):
            image, label = self._pair(index)
            raise ValueError(
                f"label {label} is {label_hw[1]}x{label_hw[0]} but its image {image} is "
                f"{image_hw[1]}x{image_hw[0]}; an ADE20K label must have its image's size."
            )

    def __len__(self) -> int:
        return len(self.images)

    def _check_label_sizes(self) -> None:
        """Every label PNG has its image's size (read from the file headers, nothing is decoded)."""
        bad = []
        for image_path in self.images:
            label_path = self.label_dir / f"{image_path.stem}.png"
            with Image.open(image_path) as image, Image.open(label_path) as label:
                if image.size != label.size:
                    bad.append(
                        f"{label_path} is {label.size[0]}x{label.size[1]} but {image_path.name} is "
                        f"{image.size[0]}x{image.size[1]}"
                    )
        if bad:
            raise ValueError(
                f"{len(bad)} ADE20K label PNG(s) differ in size from their image: "
                + "; ".join(bad[:5])
                + (" ..." if len(bad) > 5 else "")
                + ". A label must have its image's width and height "
                "(one class index per pixel); fix or remove these pairs."
            )

    def load_label(self, index: int) -> torch.Tensor:
        path = self.label_dir / f"{self.images[index].stem}.png"
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(f"{path}: label PNG has mode {im.mode}; expected a single-channel class-index image.")
            raw = np.asarray(im)
        return torch.from_numpy(reduce_zero_label(raw, self.num_classes, source=str(path)))

    def __getitem__(self, index: int):
        image = tv_tensors.Image(read_rgb(self.images[index]))
        label = tv_tensors.Mask(self.load_label(index))
        self._check_sizes(index, image.shape[-2:], label.shape[-2:])
        if self.transforms is None:
            return image, label
        if self.transform_label:
            return self.transforms(image, label)
        return self.transforms(image), label


def train_transforms(
    crop_size: int = 512, scale_range: Sequence[float] = (0.5, 2.0), photometric: bool = True
) -> v2.Compose:
    """mmseg ADE20K train pipeline: random rescale (shorter side crop·U(scale_range)), random crop (pad the image with
    the mean pixel, i.e. 0 after normalisation as mmseg's ``Pad`` after ``Normalize``, and the label with 255),
    horizontal flip, photometric distortion (SSD-style, each op with p=0.5), float + ImageNet normalisation."""
    lo, hi = int(crop_size * scale_range[0]), int(crop_size * scale_range[1])
    ops = [
        v2.RandomShortestSize(
            min_size=list(range(lo, hi + 1, max(1, (hi - lo) // 16))), max_size=4 * hi, antialias=True
        ),
        v2.RandomCrop(
            crop_size, pad_if_needed=True, fill={tv_tensors.Image: MEAN_PIXEL, tv_tensors.Mask: IGNORE_INDEX}
        ),
        v2.RandomHorizontalFlip(),
    ]
    if photometric:
        ops.append(
            v2.RandomPhotometricDistort(
                brightness=(0.875, 1.125), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.05, 0.05), p=0.5
            )
        )
    ops += [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return v2.Compose(ops)


def val_transforms(crop_size: int = 512) -> v2.Compose:
    """Image-only eval pipeline: shorter side → ``crop_size`` (longer ≤ 4×), float + ImageNet normalisation."""
    return v2.Compose(
        [
            v2.Resize(crop_size, max_size=4 * crop_size, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def list_collate(batch):
    """Variable-size eval samples → ``(list[image], list[label])``."""
    images, labels = zip(*batch)
    return list(images), list(labels)


class ADE20KDataModule(ResumableDataModule):
    """ADE20K train (random crops, stacked) and val (full images, lists) loaders; 150 classes, ignore 255.

    ``img_size`` is the run's one size knob: the training crop side and the evaluation shorter side (the recipes also
    set the sliding window, the backbone's position-embedding grid and the task's ``crop_size`` from it).
    With ``generate_if_missing``, ``root`` is the folder of the embedded ADE-format synthetic set, generated there first
    if absent (:mod:`mimlab.data.synthetic_dense`); any other folder is then refused.
    Sharding, seeding and resume: :class:`~mimlab.data.base.ResumableDataModule` (``val_batch_size`` defaults to 1).
    """

    val_collate = staticmethod(list_collate)

    def __init__(
        self,
        root: str,
        img_size: int = 512,
        scale_range: Sequence[float] = (0.5, 2.0),
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_classes: int = 150,
        photometric: bool = True,
        generate_if_missing: bool = False,
        synthetic_size: int = 64,
        **kwargs,
    ):
        super().__init__(root, batch_size=batch_size, val_batch_size=val_batch_size, **kwargs)
        self.img_size, self.scale_range = img_size, tuple(scale_range)
        self.num_classes, self.photometric = num_classes, photometric
        self.generate_if_missing, self.synthetic_size = generate_if_missing, synthetic_size
        if generate_if_missing:  # root must be absent, empty or a set mimlab generated: never a user's folder
            check_generated_root(self.root, "ade20k", ADE20K_OWN_DATA_HINT)

    def prepare_data(self) -> None:
        if self.generate_if_missing:
            write_ade20k(self.root, size=self.synthetic_size)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        super().setup(stage)

    def build_datasets(self) -> tuple[ADE20KSegmentation, ADE20KSegmentation]:
        train = ADE20KSegmentation(
            self.root,
            "training",
            train_transforms(self.img_size, self.scale_range, self.photometric),
            True,
            self.num_classes,
        )
        val = ADE20KSegmentation(self.root, "validation", val_transforms(self.img_size), False, self.num_classes)
        return train, val

    def data_identity(self) -> tuple[str, Iterable[str]]:
        def lines():
            for dataset in (self.train_set, self.val_set):
                yield from (f"{dataset.image_dir.name}/{p.name}" for p in dataset.images)

        return f"{len(self.train_set)} train + {len(self.val_set)} val images", lines()  # type: ignore[arg-type]
