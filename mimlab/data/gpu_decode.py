"""JPEG decode + crop on the training device (nvjpeg through ``torchvision.io.decode_jpeg(device='cuda')``).

The loader workers only read file bytes; :meth:`GPUDecodeImageNetDataModule.transfer_batch_to_device` decodes the whole
batch on the device in one batched call, then applies the MAE transforms there: RandomResizedCrop(scale, bicubic,
antialiased) + horizontal flip + normalise for training, Resize(img/crop_pct) + CenterCrop + normalise for evaluation.
On a CPU trainer the same code decodes on the CPU (that is what the tests run). docs/performance.md §3: PIL on 16 cores
delivers ~2.4k img/s, nvjpeg decode ~18.9k img/s on one H100, so this path removes the loader bottleneck of MAE-B.

Output batches are ``(images (N, 3, S, S) float, ImageNet-normalised, labels (N,))``, like ``data=imagenet``.
JPEG files only (ImageNet is all JPEG); use ``data=imagenet`` for other formats.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import find_classes
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from mimlab.data.image_folder import DataLayoutError, find_images
from mimlab.data.imagenet import ImageNetDataModule
from mimlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


class EncodedImageFolder(Dataset):
    """``root/<class>/*.jp(e)g`` -> (uint8 tensor of the file bytes, class index); classes in ImageFolder order."""

    def __init__(self, root: str | Path, hint: str = "", class_to_idx: dict[str, int] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} does not exist. {hint}")
        self.root = root
        self.classes, self.class_to_idx = find_classes(str(root))
        if class_to_idx is not None:  # label by the training split's names (see CheckedImageFolder)
            unknown = [c for c in self.classes if c not in class_to_idx]
            if unknown:
                raise DataLayoutError(
                    f"{root} has class folder(s) that the training split does not have: "
                    f"{', '.join(unknown[:10])}. Labels are matched by folder name: rename them to "
                    "training class names, or remove them."
                )
            self.classes, self.class_to_idx = sorted(class_to_idx, key=class_to_idx.get), dict(class_to_idx)  # type: ignore[arg-type]
        self.samples, skipped = find_images(root, self.class_to_idx, extensions=(".jpg", ".jpeg"))
        if skipped:
            log.warning("%s: %d entries left out, e.g. %s", root, len(skipped), "; ".join(skipped[:3]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        """(file bytes, label, augmentation seed drawn from torch's RNG: per sample under the DataModule's seeding)."""
        path, label = self.samples[index]
        return read_file(path), label, int(torch.randint(2**62, ()))


def collate_encoded(batch: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (all files' bytes concatenated (B,), per-file byte counts (N,), labels (N,), augmentation seeds (N,)).

    One storage per batch: a worker hands each storage to the main process through a file descriptor, and a list of
    N separate byte tensors per batch runs out of descriptors ("Bad file descriptor") at ImageNet batch sizes."""
    data = [d for d, _, _ in batch]
    return (
        torch.cat(data),
        torch.tensor([d.numel() for d in data]),
        torch.tensor([b[1] for b in batch]),
        torch.tensor([b[2] for b in batch]),
    )


def split_encoded(flat: Tensor, sizes: Tensor) -> list[Tensor]:
    """Inverse of :func:`collate_encoded`'s concatenation: the files' byte tensors (views of ``flat``)."""
    return list(torch.split(flat, sizes.tolist()))


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` (10 tries, then the centre crop fallback): (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class DeviceTransform:
    """Batched decode + crop on ``device``. ``train``: RRC(scale, ratio 3/4-4/3) + flip; else resize + centre crop.

    Given ``seeds`` (one per image, as the DataModule's loader delivers them) each image's crop and flip come from its
    own ``random.Random(seed)``, so they depend only on (seed, epoch, index) and resume exactly; without, from ``seed``.
    """

    def __init__(
        self,
        img_size: int,
        train: bool,
        scale: tuple[float, float] = (0.2, 1.0),
        hflip: float = 0.5,
        crop_pct: float = 224 / 256,
        seed: int = 0,
    ) -> None:
        self.img_size, self.train, self.scale, self.hflip, self.crop_pct = (
            img_size,
            train,
            tuple(scale),
            hflip,
            crop_pct,
        )
        self.rng = random.Random(seed)

    def _resize(self, img: Tensor, size: tuple[int, int]) -> Tensor:
        out = F.interpolate(img.unsqueeze(0).float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        return out.squeeze(0)

    def _one(self, img: Tensor, rng: random.Random) -> Tensor:
        _, h, w = img.shape
        if self.train:
            top, left, ch, cw = random_resized_crop_box(h, w, self.scale, (3 / 4, 4 / 3), rng)  # type: ignore[arg-type]
            out = self._resize(img[:, top : top + ch, left : left + cw], (self.img_size, self.img_size))
            return out.flip(-1) if rng.random() < self.hflip else out
        short = int(round(self.img_size / self.crop_pct))  # torchvision Resize(int) / CenterCrop size arithmetic
        size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        out = self._resize(img, size)
        top, left = int(round((size[0] - self.img_size) / 2.0)), int(round((size[1] - self.img_size) / 2.0))
        return out[:, top : top + self.img_size, left : left + self.img_size]

    def __call__(self, encoded: list[Tensor], device: torch.device, seeds: list[int] | None = None) -> Tensor:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        rngs = [random.Random(s) for s in seeds] if seeds is not None else [self.rng] * len(decoded)
        images = torch.stack([self._one(img, rng) for img, rng in zip(decoded, rngs)]).clamp_(0, 255).div_(255)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std


class GPUDecodeImageNetDataModule(ImageNetDataModule):
    """:class:`ImageNetDataModule` whose workers read bytes and whose device decodes and augments (see module doc)."""

    def __init__(self, root: str, crop_scale: tuple[float, float] = (0.2, 1.0), seed: int = 0, **kwargs: Any) -> None:
        super().__init__(root, seed=seed, **kwargs)
        self.train_device_transform = DeviceTransform(self.img_size, train=True, scale=tuple(crop_scale), seed=seed)  # type: ignore[arg-type]
        self.val_device_transform = DeviceTransform(self.img_size, train=False, seed=seed)

    train_collate = val_collate = staticmethod(collate_encoded)

    def build_datasets(self) -> tuple[EncodedImageFolder, _DecodedView]:  # type: ignore[override]
        train = EncodedImageFolder(self.root / "train", self.hint)
        val = EncodedImageFolder(self.root / "val", self.hint, class_to_idx=train.class_to_idx)
        return train, _DecodedView(val, self.val_device_transform)

    def _loader(self, dataset: Dataset, *args: Any, **kwargs: Any) -> DataLoader:
        """The base loader (resumable seeded sampler, DDP split) over the bytes; validation reads the encoded view."""
        return super()._loader(dataset.encoded if isinstance(dataset, _DecodedView) else dataset, *args, **kwargs)

    def mask_image_size(self) -> tuple[int, int]:
        """The workers see bytes; the masks are drawn for the decoded ``img_size`` crops."""
        return self.img_size, self.img_size

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> tuple[Any, ...]:
        """(bytes, sizes, labels, seeds[, masks]) -> (images, labels[, masks]) on ``device``."""
        flat, sizes, labels, seeds, *masks = batch
        training = self.trainer is None or self.trainer.training
        transform = self.train_device_transform if training else self.val_device_transform
        images = transform(split_encoded(flat, sizes), device, seeds.tolist())
        return (images, labels.to(device, non_blocking=True), *(m.to(device, non_blocking=True) for m in masks))


class _DecodedView(Dataset):
    """Indexable decoded view of the validation set (for the reconstruction panels): item -> (image (3,S,S), label)."""

    def __init__(self, encoded: EncodedImageFolder, transform: DeviceTransform) -> None:
        self.encoded, self.transform = encoded, transform
        self.root, self.classes, self.samples = encoded.root, encoded.classes, encoded.samples

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        data, label, _ = self.encoded[index]
        return self.transform([data], torch.device("cpu"))[0], label
