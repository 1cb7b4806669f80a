"""WebDataset shards of an ImageNet-layout folder, and a DataModule that reads them (``make shards``).

Layout written by :func:`write_shards` (``python -m mimlab.data.shards --src data/imagenet --dst data/imagenet-shards``):
``<dst>/<split>-000000.tar ...`` (plain POSIX tar files in the WebDataset convention; one sample = ``<key>.jpg`` (the
original JPEG bytes, or a re-encode at a shorter side of ``max_short_side`` px) + ``<key>.cls`` (the class index as
text)) and ``<dst>/<split>.json`` (class names in ImageFolder order, sample count, shard names and the tar index:
per sample its shard, byte offset, byte size and label). Samples are shuffled once at write time.

Reading: :class:`TarShardDataset` is a map-style dataset over the tar index: a sample is one ``seek`` + ``read`` in an
already open shard, so the per-file open/stat cost of 1.28M small files on network file systems is gone while the
order, DDP split, per-sample seeded augmentation and exact mid-epoch resume are those of every other DataModule
(:class:`~mimlab.data.base.ResumableDataModule`). A streaming reader with a shuffle buffer cannot resume mid-epoch
exactly, because the buffer's content is lost with the process. Shards do not make JPEG decoding cheaper (see
``mimlab.data.gpu_decode``).

Why WebDataset's format rather than LitData: the shards are ordinary tar files (inspect them with ``tar tf``, index them
with the standard library ``tarfile``, copy them with anything), no index server or cloud SDK is needed, and the one
dependency (``webdataset``, only to write them: the ``shards`` extra) is small and pure Python.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import find_classes

from mimlab.data.base import ResumableDataModule
from mimlab.data.image_folder import CorruptImageError, DataLayoutError, find_images, to_rgb
from mimlab.data.transforms import eval_transform, pretrain_transform
from mimlab.utils.extras import MissingExtraError, require

log = logging.getLogger(__name__)


def _encoded(path: str, max_short_side: int | None, quality: int) -> bytes:
    if not max_short_side:
        return Path(path).read_bytes()
    with Image.open(path) as img:
        img = to_rgb(img)
        scale = max_short_side / min(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()


def index_shard(path: Path) -> list[tuple[int, int, int]]:
    """``[(offset, size, label), ...]`` of the ``.jpg`` members of one shard, in tar order (labels from ``.cls``)."""
    jpg, cls = {}, {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext == "jpg":
                jpg[key] = (member.offset_data, member.size)
            elif ext == "cls":
                cls[key] = int(tar.extractfile(member).read())  # type: ignore[union-attr]
    missing = sorted(set(jpg) ^ set(cls))
    if missing:
        raise ValueError(
            f"{path}: sample(s) {missing[:5]} lack a .jpg or a .cls member; rewrite the shards with make shards"
        )
    return [(*jpg[key], cls[key]) for key in jpg]


def write_shards(
    src: str | Path,
    dst: str | Path,
    split: str = "train",
    shard_size: int = 1000,
    seed: int = 0,
    max_short_side: int | None = None,
    quality: int = 95,
) -> dict:
    """Write ``<src>/<split>/<class>/*`` as shuffled ``<dst>/<split>-NNNNNN.tar`` shards of ``shard_size`` samples.

    Class indices follow torchvision ``ImageFolder`` (sorted folder names), so labels match ``data=imagenet``.
    ``max_short_side`` re-encodes images larger than that (FFCV/DailyMAE style; cuts decode cost, a documented option).
    Returns the metadata also written to ``<dst>/<split>.json`` (with the tar index, see module docstring).
    """
    wds = require("webdataset", "Writing shards (make shards, python -m mimlab.data.shards)")
    folder = Path(src) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"make shards: {folder} does not exist; SRC must hold {split}/<class>/<image> folders")
    classes, class_to_idx = find_classes(str(folder))
    samples, skipped = find_images(folder, class_to_idx)
    if skipped:
        log.warning("%s: %d entries left out, e.g. %s", folder, len(skipped), "; ".join(skipped[:3]))
    random.Random(seed).shuffle(samples)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(dst / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for index, (path, label) in enumerate(samples):
            sink.write({"__key__": f"{index:09d}", "jpg": _encoded(path, max_short_side, quality), "cls": str(label)})
    shards = sorted(p.name for p in dst.glob(f"{split}-*.tar"))
    index = [[i, *entry] for i, name in enumerate(shards) for entry in index_shard(dst / name)]  # type: ignore[assignment]
    meta = {
        "split": split,
        "classes": classes,
        "count": len(samples),
        "shards": shards,
        "max_short_side": max_short_side,
        "source": str(Path(src).resolve()),
        "samples": index,
    }
    (dst / f"{split}.json").write_text(json.dumps(meta))
    return meta


class TarShardDataset(Dataset):
    """Map-style view of one split's shards: ``dataset[i] -> (transform(RGB image), label)`` via the tar index."""

    def __init__(self, root: Path, meta: dict, transform: Callable) -> None:
        self.root, self.transform = root, transform
        self.shards = [root / name for name in meta["shards"]]
        self.classes = meta["classes"]
        self.samples = meta["samples"]  # [shard, offset, size, label]
        self._files: dict[int, int] = {}  # file descriptors of the shards opened so far

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def read(self, index: int) -> tuple[bytes, int]:
        """The encoded JPEG bytes and the label of sample ``index``."""
        shard, offset, size, label = self.samples[index]
        if shard not in self._files:  # kept open; pread leaves the file offset alone, so forked workers may share it
            self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return os.pread(self._files[shard], size, offset), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        data, label = self.read(index)
        try:
            with Image.open(io.BytesIO(data)) as img:
                rgb = to_rgb(img)
        except (OSError, SyntaxError) as err:
            shard, offset = self.samples[index][:2]
            raise CorruptImageError(
                f"cannot decode sample {index} of {self.shards[shard]} (byte {offset}): {err}. "
                "Rewrite the shards with make shards."
            ) from err
        return self.transform(rgb), label


class ShardedImageNetDataModule(ResumableDataModule):
    """Reads :func:`write_shards` output through the tar index (see module docstring); args as
    :class:`mimlab.data.imagenet.ImageNetDataModule`. Labels and classes are those of the source ImageNet folder."""

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        img_size: int = 224,
        train_transform: Callable | None = None,
        val_transform: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, batch_size=batch_size, **kwargs)
        self.img_size = img_size
        self.train_transform = train_transform or pretrain_transform(img_size)
        self.val_transform = val_transform or eval_transform(img_size)
        self._meta: dict[str, dict] = {}

    def meta(self, split: str) -> dict:
        """``<root>/<split>.json`` (with its tar index, built from the shards when an older writer left none)."""
        if split not in self._meta:
            path = self.root / f"{split}.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: data.root must be a folder written by `make shards` "
                    f"(python -m mimlab.data.shards --src <imagenet> --dst {self.root})"
                )
            meta = json.loads(path.read_text())
            if "samples" not in meta:
                log.info("%s has no tar index; indexing its %d shards", path, len(meta["shards"]))
                meta["samples"] = [
                    [i, *e] for i, name in enumerate(meta["shards"]) for e in index_shard(self.root / name)
                ]
            self._meta[split] = meta
        return self._meta[split]

    @property
    def num_classes(self) -> int:
        return len(self.meta("train")["classes"])

    def build_datasets(self) -> tuple[TarShardDataset, TarShardDataset]:
        train, val = self.meta("train"), self.meta("val")
        if val["classes"] != train["classes"]:
            raise DataLayoutError(
                f"{self.root}: val.json and train.json list different classes; write both splits "
                "from one ImageNet folder with make shards"
            )
        return (
            TarShardDataset(self.root, train, self.train_transform),
            TarShardDataset(self.root, val, self.val_transform),
        )

    def data_identity(self) -> tuple[str, Iterable[str]]:
        def lines():
            for split in ("train", "val"):
                meta = self.meta(split)
                yield from meta["classes"]
                counts = Counter(sample[0] for sample in meta["samples"])
                yield from (f"{name} {counts[i]}" for i, name in enumerate(meta["shards"]))

        return f"{len(self.train_set)} train + {len(self.val_set)} val samples in shards", lines()  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description="Write WebDataset shards of an ImageNet-layout folder (make shards).")
    parser.add_argument("--src", required=True, help="folder with train/<class>/<image> and val/<class>/<image>")
    parser.add_argument("--dst", required=True, help="output folder for <split>-NNNNNN.tar and <split>.json")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (~110 MB for ImageNet)")
    parser.add_argument("--max-short-side", type=int, default=0, help="re-encode larger images to this shorter side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split in args.splits:
        try:
            meta = write_shards(args.src, args.dst, split, args.shard_size, args.seed, args.max_short_side or None)
        except MissingExtraError as err:
            raise SystemExit(str(err)) from None
        print(
            f"{split}: {meta['count']} samples, {len(meta['classes'])} classes, {len(meta['shards'])} shards in {args.dst}"
        )


if __name__ == "__main__":
    main()
