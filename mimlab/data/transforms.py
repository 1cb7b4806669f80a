"""Image transforms of the MAE recipes (torchvision).

The pre-training transform ends with ``PILToTensor``: workers hand over uint8 (C, H, W) crops and the DataModule
normalises whole batches on the training device (:func:`normalize_images`, called from
``ResumableDataModule.on_after_batch_transfer``). The values equal ``ToTensor() + Normalize()`` computed in the worker
(the same float32 operations), but the workers skip the float conversion — the costliest step of the official
pipeline after decoding — and move a quarter of the bytes. The eval transform returns normalised float tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean as a uint8 pixel: padding with it before normalisation equals padding normalised images with 0 (Detectron2,
# mmseg), so padded training canvases look like the evaluation padding.
MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)


def pretrain_transform(
    img_size: int = 224, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, interpolation: str = "bicubic"
) -> T.Compose:
    """MAE / FCMAE / iTPN pre-training: RandomResizedCrop(scale 0.2-1, aspect 3/4-4/3, bicubic) + horizontal flip,
    as a uint8 (C, H, W) tensor; normalised per batch by :func:`normalize_images`. ``interpolation``: a torchvision
    ``InterpolationMode`` value (SimMIM crops with "bilinear")."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=T.InterpolationMode(interpolation)),
            T.RandomHorizontalFlip(hflip),
            T.PILToTensor(),
        ]
    )


def normalize_images(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float32 ImageNet-normalised, exactly ``Normalize(mean, std)(ToTensor()(x))`` per image."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, -1, 1, 1)
    return images.float().div(255).sub_(mean).div_(std)


def eval_transform(img_size: int = 224, crop_pct: float = 224 / 256) -> T.Compose:
    """Evaluation: Resize(img_size / crop_pct, bicubic) + CenterCrop(img_size) + normalise (MAE fine-tune eval)."""
    return T.Compose(
        [
            T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
