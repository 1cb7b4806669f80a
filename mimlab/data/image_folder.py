"""ImageNet-layout folder dataset (``<split>/<class>/<image>``) with layout checks and a corrupt-file policy.

:func:`find_images` is the one walk of such a folder (this dataset, the GPU-decode dataset, shard writing and
``mimlab.check`` use it): it never follows a folder link below a class folder, opens only regular files and takes each
file once, so links and odd files cannot loop, hang a reader or relabel images. :func:`load_rgb` decodes any PIL mode
to 8-bit RGB with its value range kept (16-bit, 32-bit integer and float images are scaled, not clipped or truncated).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
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
    """Raise :class:`DataLayoutError` unless ``split_dir`` holds class folders (images directly in it are an error);
    class folders without images are named by :func:`find_images`' callers."""
    if not split_dir.is_dir():
        raise DataLayoutError(f"data folder {split_dir} does not exist. {hint}")
    entries = sorted(split_dir.iterdir())
    loose = [p.name for p in entries if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    if loose:
        raise DataLayoutError(
            f"{split_dir} holds image files directly ({', '.join(loose[:3])}, ...); expected one sub-folder per class: "
            f"{split_dir}/<class>/<image>. Move the images into class folders (any single folder name works for unlabelled data)."
        )
    if not any(p.is_dir() for p in entries):
        raise DataLayoutError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>. {hint}")


def _class_files(class_dir: Path, extensions: tuple[str, ...], skipped: list[str]) -> list[tuple[str, os.DirEntry]]:
    """``(folder, entry)`` of every file with an image extension under ``class_dir``, folders in path order and files
    in name order (torchvision's ``make_dataset`` order). Folder links below ``class_dir`` are not followed."""
    folders, pending = [], [str(class_dir)]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as err:
            skipped.append(f"{folder}: cannot be listed ({err.strerror})")
            continue
        files = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif entry.is_symlink() and entry.is_dir():
                skipped.append(
                    f"{entry.path}: a link to the folder {os.path.realpath(entry.path)}; folder links in a class folder "
                    "are not followed (they can leave it, loop, or reach a folder twice)"
                )
            elif entry.name.lower().endswith(extensions):
                files.append(entry)
        folders.append((folder, sorted(files, key=lambda e: e.name)))
    return [(folder, entry) for folder, files in sorted(folders, key=lambda f: f[0]) for entry in files]


def find_images(
    split_dir: str | Path, class_to_idx: dict[str, int], extensions: tuple[str, ...] = IMG_EXTENSIONS
) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(path, label), ...], [why each left-out entry was left out, ...])`` for ``split_dir/<class>/**/<image>``.

    A class folder may itself be a link; below it, folder links are not followed. Only regular files are taken (a FIFO
    or device named ``x.JPEG`` would block its reader), each file once per split (a second path to it, through a link
    or a hard link, is left out), and a file link into another class folder of the split is left out (the image is
    that class's). File links elsewhere (a folder of links into an image pool) are kept. Broken links are left out.
    """
    split_dir = Path(split_dir)
    split_real = split_dir.resolve()
    samples: list[tuple[str, int]] = []
    skipped: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    for name in sorted(class_to_idx):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        class_real = class_dir.resolve()
        for _, entry in _class_files(class_dir, extensions, skipped):
            try:
                info = entry.stat()  # follows a link
            except OSError as err:
                skipped.append(f"{entry.path}: a broken link ({err.strerror})")
                continue
            if not stat.S_ISREG(info.st_mode):
                skipped.append(f"{entry.path}: not a regular file (a FIFO, socket or device); not read")
                continue
            if entry.is_symlink():
                target = Path(os.path.realpath(entry.path))
                if target.is_relative_to(split_real) and not target.is_relative_to(class_real):
                    skipped.append(f"{entry.path}: a link to {target}, an image of another class folder")
                    continue
            key = (info.st_dev, info.st_ino)
            if key in seen:
                skipped.append(f"{entry.path}: the same file as {seen[key]} (a link or hard link); taken once")
                continue
            seen[key] = entry.path
            samples.append((entry.path, class_to_idx[name]))
    return samples, skipped


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel 16-bit, 32-bit integer or float values -> uint8: ``I;16*`` over 0..65535; ``I`` / ``F`` by their
    range: floats in 0..1 over 0..1, values in 0..255 as they are, in 0..65535 over 0..65535, else over min..max."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scale, offset = 255 / 65535, 0.0
    elif mode == "F" and low >= 0 and high <= 1:
        scale, offset = 255.0, 0.0
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0
    elif low >= 0 and high <= 65535:
        scale, offset = 255 / 65535, 0.0
    else:
        scale, offset = 255 / max(high - low, 1e-12), low
    return np.clip(np.round((values - offset) * scale), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of an image in any PIL mode: 16-bit / 32-bit integer / float grayscale scaled by :func:`_to_8bit`,
    premultiplied alpha (``La``, ``RGBa``) unmultiplied, the rest (CMYK, YCbCr, LAB, HSV, palette ...) by PIL."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(img), img.mode)).convert("RGB")
    if img.mode in ("La", "RGBa"):
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    return img.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file as PIL stores it (any mode); raise :class:`CorruptImageError` naming the file for an
    undecodable one, a possible decompression bomb (PIL refuses images above 2 x ``PIL.Image.MAX_IMAGE_PIXELS``
    pixels) or a path that is not a regular file (opening a FIFO would block)."""
    if not os.path.isfile(path):
        raise CorruptImageError(f"cannot decode image {path}: not a regular file")
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
    return img


def load_rgb(path: str | Path) -> Image.Image:
    """Any image file as 8-bit RGB: :func:`open_image` then :func:`to_rgb`."""
    return to_rgb(open_image(path))


class CheckedImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` that checks the layout first, walks it with :func:`find_images` (entries left out
    are in ``skipped`` and logged) and applies ``on_corrupt`` ('fail' or 'skip').

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
        self.skipped: list[str] = []
        super().__init__(str(root), transform=transform, loader=load_rgb)
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

    def make_dataset(
        self, directory: str, class_to_idx: dict[str, int], extensions=None, is_valid_file=None, allow_empty=False
    ) -> list[tuple[str, int]]:
        samples, self.skipped = find_images(directory, class_to_idx, tuple(extensions or IMG_EXTENSIONS))
        if self.skipped:
            log.warning("%s: %d entries left out, e.g. %s", directory, len(self.skipped), "; ".join(self.skipped[:3]))
        found = {label for _, label in samples}
        names = {label: name for name, label in class_to_idx.items()}
        empty = [names[i] for i in sorted(names) if i not in found and (Path(directory) / names[i]).is_dir()]
        if empty:
            raise DataLayoutError(
                f"class folder(s) without images under {directory}: {', '.join(empty[:10])}. "
                f"Add images ({', '.join(IMG_EXTENSIONS[:4])}, ...) or remove the empty folder(s)."
            )
        return samples

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            try:
                return super().__getitem__((index + attempt) % len(self.samples))
            except CorruptImageError as err:
                if self.on_corrupt == "fail":
                    raise CorruptImageError(f"{err}. {CORRUPT_HINT}") from err
                log.warning("skipping %s", err)
        raise CorruptImageError(f"no readable image in {self.root}")
