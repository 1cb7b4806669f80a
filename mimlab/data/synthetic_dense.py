"""Embedded dense-prediction data: small COCO-format and ADE20K-format sets written to disk.

The sets use the real on-disk layouts, so the real loaders (:mod:`mimlab.data.coco`,
:mod:`mimlab.data.ade20k`) and the real evaluators run on them offline:

``<root>/coco/annotations/instances_{train,val}2017.json`` + ``<root>/coco/{train,val}2017/*.jpg``
    Each image holds 1-4 objects on a textured background. Classes are shapes with a class colour
    (``square``, ``disk``, ``triangle``) and use the non-contiguous category ids 1, 3, 5 so that the
    id → label mapping is exercised. Objects carry a polygon, an xywh box and an area; every few images
    one extra *crowd* region (``iscrowd=1``) is stored as uncompressed RLE, as in COCO.

``<root>/ade20k/ADEChallengeData2016/{images,annotations}/{training,validation}/*``
    JPEG images and 8-bit ``L`` label PNGs with values in 0..``num_classes``; 0 is "other" (ignored after the
    reduce-zero-label convention). Regions are rectangles and disks whose colour/texture depends on the class.

Run ``python -m mimlab.data.synthetic_dense --root data/synthetic`` (a progress bar is shown).
Generation is deterministic given ``seed``. Each set is written to a folder of its own, in one step, with a
manifest (:mod:`mimlab.data.generated`); a folder that mimlab did not generate is never written into.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from rich.progress import Progress

from mimlab.data.generated import write_generated

COCO_CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "disk", "supercategory": "shape"},
    {"id": 5, "name": "triangle", "supercategory": "shape"},
]
_COCO_COLOURS = {1: (220, 40, 40), 3: (40, 200, 60), 5: (50, 80, 230)}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random texture, (size, size, 3) uint8, kept darker than the object colours."""
    coarse = rng.integers(0, 90, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)  # type: ignore[attr-defined]
    noise = rng.integers(0, 25, size=(size, size, 3))
    return np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, cat_id: int, size: int) -> list[float]:
    """A flat [x1, y1, x2, y2, ...] polygon for one object of class ``cat_id`` inside a size×size image."""
    s = rng.uniform(0.2, 0.45) * size
    cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
    if cat_id == 1:  # square
        pts = [(cx - s / 2, cy - s / 2), (cx + s / 2, cy - s / 2), (cx + s / 2, cy + s / 2), (cx - s / 2, cy + s / 2)]
    elif cat_id == 3:  # disk as a 16-gon
        pts = [
            (cx + s / 2 * math.cos(a), cy + s / 2 * math.sin(a))
            for a in np.linspace(0, 2 * math.pi, 16, endpoint=False)
        ]
    else:  # triangle
        pts = [(cx, cy - s / 2), (cx + s / 2, cy + s / 2), (cx - s / 2, cy + s / 2)]
    return [round(float(v), 2) for p in pts for v in p]


def _polygon_mask(poly: list[float], size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v  # type: ignore[assignment]
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


COCO_OWN_DATA_HINT = "To train on a COCO folder of your own, use data=coco data.root=<folder>."
ADE20K_OWN_DATA_HINT = "To train on an ADE20K folder of your own, use data=ade20k data.root=<folder>."


def write_coco(
    root: str | Path,
    num_train: int = 32,
    num_val: int = 16,
    size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Generate a COCO-format set at ``root`` (``annotations/``, ``train2017/``, ``val2017/``) unless it already holds
    one; returns ``root``. Raises ``GeneratedDataError`` if ``root`` is a non-empty folder mimlab did not generate."""
    settings = dict(num_train=num_train, num_val=num_val, size=size, seed=seed)
    return write_generated(
        root,
        "coco",
        settings,
        lambda folder: _render_coco(folder, num_train, num_val, size, seed, progress),
        COCO_OWN_DATA_HINT,
    )


def _render_coco(root: Path, num_train: int, num_val: int, size: int, seed: int, progress: Progress | None) -> dict:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ann_id = 1
    for split, count, id_offset in (("train2017", num_train, 1), ("val2017", num_val, 100_001)):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        task = progress.add_task(f"coco {split}", total=count) if progress else None
        for k in range(count):
            image_id = id_offset + k
            img = _background(rng, size)
            for _ in range(int(rng.integers(1, 5))):
                cat = int(rng.choice([c["id"] for c in COCO_CATEGORIES]))  # type: ignore[arg-type]
                poly = _shape_polygon(rng, cat, size)
                mask = _polygon_mask(poly, size)
                if mask.sum() < 4:
                    continue
                img[mask.astype(bool)] = np.asarray(_COCO_COLOURS[cat]) + rng.integers(-15, 15, size=3)
                xs, ys = poly[0::2], poly[1::2]
                x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
                box = [x0, y0, min(max(xs), size) - x0, min(max(ys), size) - y0]
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cat,
                        "segmentation": [poly],
                        "area": float(mask.sum()),
                        "bbox": [round(v, 2) for v in box],
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
            if k % 4 == 3:  # a crowd region of small disks, stored as uncompressed RLE
                crowd = np.zeros((size, size), dtype=np.uint8)
                for _ in range(3):
                    crowd |= _polygon_mask(_shape_polygon(rng, 3, size // 3), size)
                ys_, xs_ = np.nonzero(crowd)
                img[crowd.astype(bool)] = _COCO_COLOURS[3]
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": 3,
                        "segmentation": _uncompressed_rle(crowd),
                        "area": float(crowd.sum()),
                        "bbox": [
                            float(xs_.min()),
                            float(ys_.min()),
                            float(xs_.max() - xs_.min() + 1),
                            float(ys_.max() - ys_.min() + 1),
                        ],
                        "iscrowd": 1,
                    }
                )
                ann_id += 1
            name = f"{image_id:012d}.jpg"
            Image.fromarray(img).save(root / split / name, quality=95)
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            if progress:
                progress.advance(task)  # type: ignore[arg-type]
        data = {
            "info": {"description": "mimlab synthetic COCO-format set"},
            "images": images,
            "annotations": list(annotations),
            "categories": COCO_CATEGORIES,
        }
        with open(root / "annotations" / f"instances_{split[:-4]}2017.json", "w") as f:
            json.dump(data, f)
        annotations.clear()
    return {"train2017": num_train, "val2017": num_val}


def write_ade20k(
    root: str | Path,
    num_train: int = 32,
    num_val: int = 8,
    size: int = 64,
    num_used_classes: int = 4,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Generate an ADEChallengeData2016-layout set under ``root`` unless it already holds one (labels use classes
    1..num_used_classes and 0 = other); returns ``root``. Raises ``GeneratedDataError`` for a folder mimlab did not
    generate."""
    settings = dict(num_train=num_train, num_val=num_val, size=size, num_used_classes=num_used_classes, seed=seed)
    return write_generated(
        root,
        "ade20k",
        settings,
        lambda folder: _render_ade20k(folder, num_train, num_val, size, num_used_classes, seed, progress),
        ADE20K_OWN_DATA_HINT,
    )


def _render_ade20k(
    folder: Path, num_train: int, num_val: int, size: int, num_used_classes: int, seed: int, progress: Progress | None
) -> dict:
    root = folder / "ADEChallengeData2016"
    rng = np.random.default_rng(seed + 1)
    colours = rng.integers(60, 255, size=(num_used_classes + 1, 3))
    for split, count in (("training", num_train), ("validation", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        task = progress.add_task(f"ade20k {split}", total=count) if progress else None
        for k in range(count):
            label = np.zeros((size, size), dtype=np.uint8)
            # two large "stuff" halves and a few "things"
            split_at = int(rng.integers(size // 4, 3 * size // 4))
            label[:split_at] = int(rng.integers(1, num_used_classes + 1))
            label[split_at:] = int(rng.integers(1, num_used_classes + 1))
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.integers(0, num_used_classes + 1))  # 0 = "other" regions exist too
                poly = _shape_polygon(rng, int(rng.choice([1, 3])), size)
                label[_polygon_mask(poly, size).astype(bool)] = cls
            img = _background(rng, size).astype(np.int64)
            img = np.where(label[..., None] > 0, colours[label] + rng.integers(-20, 20, size=(size, size, 3)), img)
            name = f"ADE_{'train' if split == 'training' else 'val'}_{k + 1:08d}"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / "images" / split / f"{name}.jpg", quality=95
            )
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{name}.png")
            if progress:
                progress.advance(task)  # type: ignore[arg-type]
    return {"training": num_train, "validation": num_val}


def write_dense_synthetic(
    root: str | Path = "data/synthetic", size: int = 64, seed: int = 0, show_progress: bool = True
) -> Path:
    """Write both sets (``<root>/coco`` and ``<root>/ade20k``); returns ``root``."""
    root = Path(root)
    with Progress(disable=not show_progress) as progress:
        write_coco(root / "coco", size=size, seed=seed, progress=progress)
        write_ade20k(root / "ade20k", size=size, seed=seed, progress=progress)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the embedded COCO-format and ADE20K-format synthetic sets.")
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_dense_synthetic(args.root, size=args.size, seed=args.seed)
    print(f"wrote {out / 'coco'} and {out / 'ade20k'}")


if __name__ == "__main__":
    main()
