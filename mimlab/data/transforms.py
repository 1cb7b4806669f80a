"""Image transforms of the MAE recipes (torchvision). Outputs are ImageNet-normalised float tensors (C, H, W)."""
from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(img_size: int = 224, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5,
                       interpolation: str = "bicubic") -> T.Compose:
    """MAE / FCMAE / iTPN pre-training: RandomResizedCrop(scale 0.2-1, aspect 3/4-4/3, bicubic) + horizontal flip +
    normalise. ``interpolation``: a torchvision ``InterpolationMode`` value (SimMIM crops with "bilinear")."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=T.InterpolationMode(interpolation)),
        T.RandomHorizontalFlip(hflip),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(img_size: int = 224, crop_pct: float = 224 / 256) -> T.Compose:
    """Evaluation: Resize(img_size / crop_pct, bicubic) + CenterCrop(img_size) + normalise (MAE fine-tune eval)."""
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
