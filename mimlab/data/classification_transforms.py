"""Training transforms of the supervised recipes (timm ``create_transform``), ImageNet-normalised (C, H, W) tensors.

* ``finetune_transform``: MAE / ConvNeXt V2 / iTPN fine-tuning: RandomResizedCrop(bicubic) + flip + RandAugment
  ``rand-m9-mstd0.5-inc1`` + random erasing (p 0.25, mode pixel, 1 box) - MAE ``util/datasets.py`` build_transform.
* ``linprobe_transform``: MAE linear probe: RandomResizedCrop(bicubic) + flip only.
Evaluation uses :func:`mimlab.data.transforms.eval_transform` (Resize(img/0.875) + CenterCrop).
"""

from __future__ import annotations

from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from torchvision import transforms as T

from mimlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def finetune_transform(
    img_size: int = 224,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    color_jitter: float | None = None,
    interpolation: str = "bicubic",
) -> T.Compose:
    """timm training transform with the fine-tuning recipe's RandAugment and random erasing."""
    transform = create_transform(
        input_size=img_size,
        is_training=True,
        color_jitter=color_jitter,  # type: ignore[arg-type]
        auto_augment=auto_augment,
        interpolation=interpolation,
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if "Posterize" in op.name:
                    op.aug_fn = posterize_zero_bits_ok
    return transform


def posterize_zero_bits_ok(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with Pillow < 12 semantics: 0 bits gives a black image (Pillow >= 12 raises instead).

    ``inc1`` posterize keeps ``4 - int(level * 0.4)`` bits, i.e. 0 when ``mstd`` noise clips the level at 10 (~2% of draws).
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def linprobe_transform(img_size: int = 224) -> T.Compose:
    """RandomResizedCrop(img_size, bicubic) + horizontal flip + normalise (MAE main_linprobe)."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
