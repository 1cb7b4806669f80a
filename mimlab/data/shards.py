"""WebDataset shards of an ImageNet-layout folder, and a DataModule that streams them (``make shards``).

Layout written by :func:`write_shards` (``python -m mimlab.data.shards --src data/imagenet --dst data/imagenet-shards``):
``<dst>/<split>-000000.tar ...`` (plain POSIX tar files; one sample = ``<key>.jpg`` (the original JPEG bytes, or a
re-encode at a shorter side of ``max_short_side`` px) + ``<key>.cls`` (the class index as text)) and ``<dst>/<split>.json``
(class names in ImageFolder order, sample count, shard names). Samples are shuffled once at write time.

Why WebDataset rather than LitData: the shards are ordinary tar files (inspect them with ``tar tf``, write them with the
standard library, copy them with anything), streaming needs no index server or cloud SDK, splitting by DDP rank and
loader worker is two functions, and the one dependency is small and pure Python. Shards cut the per-file open/stat cost
of 1.28M small files on network file systems; they do not make JPEG decoding cheaper (see ``mimlab.data.gpu_decode``).
"""
from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from mimlab.data.transforms import eval_transform, pretrain_transform
from mimlab.data.workers import init_worker


def _wds():
    try:
        import webdataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("data=imagenet_shards and `make shards` need the webdataset package: pip install webdataset") from err
    return webdataset


def _encoded(path: str, max_short_side: int | None, quality: int) -> bytes:
    if not max_short_side:
        return Path(path).read_bytes()
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = max_short_side / min(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()


def write_shards(src: str | Path, dst: str | Path, split: str = "train", shard_size: int = 1000, seed: int = 0,
                 max_short_side: int | None = None, quality: int = 95) -> dict:
    """Write ``<src>/<split>/<class>/*`` as shuffled ``<dst>/<split>-NNNNNN.tar`` shards of ``shard_size`` samples.

    Class indices follow torchvision ``ImageFolder`` (sorted folder names), so labels match ``data=imagenet``.
    ``max_short_side`` re-encodes images larger than that (FFCV/DailyMAE style; cuts decode cost, a documented option).
    Returns the metadata also written to ``<dst>/<split>.json``.
    """
    wds = _wds()
    folder = Path(src) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"make shards: {folder} does not exist; SRC must hold {split}/<class>/<image> folders")
    classes, class_to_idx = find_classes(str(folder))
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    random.Random(seed).shuffle(samples)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(dst / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for index, (path, label) in enumerate(samples):
            sink.write({"__key__": f"{index:09d}", "jpg": _encoded(path, max_short_side, quality), "cls": str(label)})
    shards = sorted(p.name for p in dst.glob(f"{split}-*.tar"))
    meta = {"split": split, "classes": classes, "count": len(samples), "shards": shards,
            "max_short_side": max_short_side, "source": str(Path(src).resolve())}
    (dst / f"{split}.json").write_text(json.dumps(meta, indent=1))
    return meta


class ShardedImageNetDataModule(L.LightningDataModule):
    """Streams :func:`write_shards` output with WebDataset: shards split by DDP rank then by loader worker.

    Args mirror :class:`mimlab.data.imagenet.ImageNetDataModule`; ``shuffle_buffer`` is the in-memory sample shuffle.
    Every rank runs the same number of batches per epoch, ``count // (batch_size * world_size)`` (DDP needs equal lengths),
    so use at least ``world_size * num_workers`` shards. ``val_set`` is the first ``panel_images`` validation samples,
    indexable, for the reconstruction panels.
    """

    def __init__(self, root: str, batch_size: int = 64, img_size: int = 224, num_workers: int = 4,
                 pin_memory: bool = True, persistent_workers: bool = True, prefetch_factor: int | None = 2,
                 shuffle_buffer: int = 5000, panel_images: int = 16, seed: int = 0,
                 train_transform: Callable | None = None, val_transform: Callable | None = None) -> None:
        super().__init__()
        self.root = Path(root)
        self.batch_size = batch_size
        self.img_size = img_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.shuffle_buffer = shuffle_buffer
        self.panel_images = panel_images
        self.seed = seed
        self.train_transform = train_transform or pretrain_transform(img_size)
        self.val_transform = val_transform or eval_transform(img_size)
        self._val_set: list | None = None

    def meta(self, split: str) -> dict:
        path = self.root / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: data.root must be a folder written by `make shards` "
                                    f"(python -m mimlab.data.shards --src <imagenet> --dst {self.root})")
        return json.loads(path.read_text())

    @property
    def num_classes(self) -> int:
        return len(self.meta("train")["classes"])

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _pipeline(self, split: str, train: bool):
        wds = _wds()
        meta = self.meta(split)
        urls = [str(self.root / name) for name in meta["shards"]]
        transform = self.train_transform if train else self.val_transform
        dataset = wds.WebDataset(urls, shardshuffle=len(urls) if train else False, nodesplitter=wds.split_by_node,
                                 workersplitter=wds.split_by_worker, seed=self.seed, empty_check=False)
        if train:
            dataset = dataset.shuffle(self.shuffle_buffer)
        return dataset.decode("pil").to_tuple("jpg", "cls").map_tuple(transform, int), meta["count"]

    def _loader(self, split: str, train: bool):
        wds = _wds()
        dataset, count = self._pipeline(split, train)
        dataset = dataset.batched(self.batch_size, partial=not train)
        per_rank = count // (self.batch_size * self._world_size()) if train else -(-count // (self.batch_size * self._world_size()))
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                               persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor,
                               worker_init_fn=init_worker)
        if train:  # repeat the stream so every rank yields exactly per_rank batches even with uneven shard splits
            loader = loader.repeat()
        return loader.with_epoch(max(per_rank, 1)).with_length(max(per_rank, 1), silent=True)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    @property
    def val_set(self) -> list[tuple[torch.Tensor, int]]:
        if self._val_set is None:
            dataset, _ = self._pipeline("val", train=False)
            self._val_set = []
            for sample in dataset:
                self._val_set.append(sample)
                if len(self._val_set) >= self.panel_images:
                    break
        return self._val_set


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
        meta = write_shards(args.src, args.dst, split, args.shard_size, args.seed, args.max_short_side or None)
        print(f"{split}: {meta['count']} samples, {len(meta['classes'])} classes, {len(meta['shards'])} shards in {args.dst}")


if __name__ == "__main__":
    main()
