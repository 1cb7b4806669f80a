"""ImageNet-layout folder dataset (``<split>/<class>/<image>``) with layout checks and a corrupt-file policy."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)


CORRUPT_HINT = "Replace or delete the file, or set data.on_corrupt=skip to skip bad files."


class DataLayoutError(ValueError):
    """The data folder does not have the layout a DataModule needs; the message says what to do."""


class CorruptImageError(RuntimeError):
    """An image file cannot be decoded; the message names it."""


def check_image_folder(split_dir: Path, hint: str) -> None:
    """Raise :class:`DataLayoutError` unless ``split_dir`` holds class folders that each contain images."""
    if not split_dir.is_dir():
        raise DataLayoutError(f"data folder {split_dir} does not exist. {hint}")
    entries = sorted(split_dir.iterdir())
    loose = [p.name for p in entries if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    if loose:
        raise DataLayoutError(
            f"{split_dir} holds image files directly ({', '.join(loose[:3])}, ...); expected one sub-folder per class: "
            f"{split_dir}/<class>/<image>. Move the images into class folders (any single folder name works for unlabelled data)."
        )
    classes = [p for p in entries if p.is_dir()]
    if not classes:
        raise DataLayoutError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>. {hint}")
    empty = [
        p.name for p in classes if not any(f.suffix.lower() in IMG_EXTENSIONS for f in p.rglob("*") if f.is_file())
    ]
    if empty:
        raise DataLayoutError(
            f"class folder(s) without images under {split_dir}: {', '.join(empty[:10])}. "
            f"Add images ({', '.join(IMG_EXTENSIONS[:4])}, ...) or remove the empty folder(s)."
        )


def load_rgb(path: str | Path) -> Image.Image:
    """Open any PIL-readable image as RGB (grayscale, CMYK, RGBA, palette are converted); raise CorruptImageError
    naming the file for an undecodable one, including a possible decompression bomb (PIL refuses images above
    2 x ``PIL.Image.MAX_IMAGE_PIXELS`` pixels)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Image.DecompressionBombError as err:
        raise CorruptImageError(
            f"cannot decode image {path}: refused as a possible decompression bomb ({err})"
        ) from err
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")  # type: ignore[assignment]
    return img.convert("RGB")


class CheckedImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` that checks the layout first and applies ``on_corrupt`` ('fail' or 'skip').

    ``class_to_idx`` (e.g. the training split's) labels the class folders by name with that mapping instead of by
    their sorted position here; a folder whose name the mapping lacks is a :class:`DataLayoutError`.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        on_corrupt: str = "fail",
        hint: str = "",
        class_to_idx: dict[str, int] | None = None,
    ) -> None:
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"data.on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
        check_image_folder(Path(root), hint)
        self.given_class_to_idx = class_to_idx
        super().__init__(str(root), transform=transform, loader=load_rgb, allow_empty=class_to_idx is not None)
        self.on_corrupt = on_corrupt

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, class_to_idx = super().find_classes(directory)
        if self.given_class_to_idx is None:
            return classes, class_to_idx
        unknown = [c for c in classes if c not in self.given_class_to_idx]
        if unknown:
            raise DataLayoutError(
                f"{directory} has class folder(s) that the training split does not have: {', '.join(unknown[:10])}. "
                "Labels are matched by folder name: rename them to training class names, or remove them."
            )
        return sorted(self.given_class_to_idx, key=self.given_class_to_idx.get), dict(self.given_class_to_idx)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            try:
                return super().__getitem__((index + attempt) % len(self.samples))
            except CorruptImageError as err:
                if self.on_corrupt == "fail":
                    raise CorruptImageError(f"{err}. {CORRUPT_HINT}") from err
                log.warning("skipping %s", err)
        raise CorruptImageError(f"no readable image in {self.root}")
