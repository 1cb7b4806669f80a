"""The embedded default data set: coloured shapes and textures written as an ImageNet-layout folder of JPEGs.

Ten classes, each a shape/texture with its own colour family, drawn at random positions, scales and rotations over a
noisy gradient background, at random sizes between ``min_size`` and ``max_size`` pixels. The structure is learnable
(pre-training lowers the loss, a linear probe beats chance) and the files are read by the real ImageNet loader.

The set is written to a folder of its own, in one step, with a manifest (:mod:`mimlab.data.generated`); a folder
that mimlab did not generate is never written into. :func:`write_image_folder` is the one writer of these JPEGs: the
embedded set, the bench's ImageNet-size folder (:mod:`mimlab.bench.datapath`) and the GPU check's folders use it.

CLI: ``python -m mimlab.data.synthetic --root data/synthetic/imagenet`` (``make data``).
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from rich.progress import track

from mimlab.data.generated import check_generated_root, write_generated
from mimlab.data.imagenet import ImageNetDataModule

CLASSES = (
    ("circle", (220, 40, 40)),
    ("square", (40, 200, 60)),
    ("triangle", (40, 80, 230)),
    ("ring", (230, 210, 40)),
    ("cross", (210, 40, 210)),
    ("hstripes", (40, 210, 210)),
    ("checker", (245, 140, 30)),
    ("star", (130, 60, 200)),
    ("dots", (235, 235, 235)),
    ("dstripes", (140, 90, 40)),
)


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 35) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in colour)  # type: ignore[return-value]


def _background(size: tuple[int, int], rng: random.Random, nprng: np.random.Generator) -> Image.Image:
    w, h = size
    a, b = np.array(_jitter((90, 90, 90), rng, 60)), np.array(_jitter((60, 60, 60), rng, 50))
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    img = a * (1 - t) + b * t + nprng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.broadcast_to(img, (h, w, 3)), 0, 255).astype(np.uint8))


def _polygon(
    cx: float, cy: float, r: float, n: int, angle: float, inner: float | None = None
) -> list[tuple[float, float]]:
    points = []
    steps = n * 2 if inner else n
    for k in range(steps):
        radius = r if (inner is None or k % 2 == 0) else r * inner
        theta = angle + 2 * math.pi * k / steps
        points.append((cx + radius * math.cos(theta), cy + radius * math.sin(theta)))
    return points


def _draw_object(
    draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float], colour, rng: random.Random
) -> None:
    cx, cy, r = box
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, r, 4, angle), fill=colour)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=colour)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(r / 3)))
    elif kind == "cross":
        t = max(2, r / 3)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, r, 5, angle, inner=0.45), fill=colour)
    elif kind == "dots":
        for _ in range(6):
            dx, dy, dr = rng.uniform(-r, r), rng.uniform(-r, r), max(2, r / 5)
            draw.ellipse((cx + dx - dr, cy + dy - dr, cx + dx + dr, cy + dy + dr), fill=colour)
    else:
        raise ValueError(f"unknown object kind {kind}")


def _draw_texture(img: Image.Image, kind: str, colour, rng: random.Random) -> None:
    """Textures cover a random rectangle of the image."""
    w, h = img.size
    x0, y0 = rng.randint(0, w // 3), rng.randint(0, h // 3)
    x1, y1 = rng.randint(x0 + w // 2, w), rng.randint(y0 + h // 2, h)
    period = rng.randint(6, 14)
    draw = ImageDraw.Draw(img)
    for k in range(-(y1 - y0 + x1 - x0), x1 - x0 + y1 - y0, period):
        if kind == "hstripes" and 0 <= k < y1 - y0:
            draw.rectangle((x0, y0 + k, x1, y0 + k + period // 2), fill=colour)
        elif kind == "dstripes":
            draw.line((x0 + k, y0, x0 + k + (y1 - y0), y1), fill=colour, width=max(2, period // 2))
        elif kind == "checker" and 0 <= k < y1 - y0:
            for j in range(0, x1 - x0, period):
                if ((k // period) + (j // period)) % 2 == 0:
                    draw.rectangle((x0 + j, y0 + k, x0 + j + period - 1, y0 + k + period - 1), fill=colour)


def render_image(class_index: int, rng: random.Random, min_size: int = 80, max_size: int = 160) -> Image.Image:
    """One RGB image of class ``class_index`` (see :data:`CLASSES`)."""
    kind, base_colour = CLASSES[class_index]
    size = (rng.randint(min_size, max_size), rng.randint(min_size, max_size))
    img = _background(size, rng, np.random.default_rng(rng.getrandbits(32)))
    colour = _jitter(base_colour, rng)
    if kind in ("hstripes", "dstripes", "checker"):
        _draw_texture(img, kind, colour, rng)
    else:
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            r = rng.uniform(0.12, 0.3) * min(size)
            _draw_object(draw, kind, (rng.uniform(r, size[0] - r), rng.uniform(r, size[1] - r), r), colour, rng)
    return img


OWN_DATA_HINT = "To train on an ImageNet-layout folder of your own, use data=imagenet data.root=<folder>."


@dataclass(frozen=True)
class _Run:
    """Images drawn from one random stream: ``jobs`` are (split, class, index, images per class of the split)."""

    root: Path
    jobs: list[tuple[str, int, int, int]]
    seed: int
    min_size: int
    max_size: int
    sizes: tuple[tuple[int, int], ...]
    progress: str | None


def _write_run(run: _Run) -> None:
    rng = random.Random(run.seed)
    for split, c, i, count in track(run.jobs, description=run.progress) if run.progress else run.jobs:
        class_dir = run.root / split / f"{c:02d}_{CLASSES[c][0]}"
        class_dir.mkdir(parents=True, exist_ok=True)
        img = render_image(c, rng, run.min_size, run.max_size)
        if run.sizes:
            img = img.resize(run.sizes[(c * count + i) % len(run.sizes)])
        img.save(class_dir / f"{split}_{c:02d}_{i:05d}.JPEG", quality=90)


def write_image_folder(
    root: str | Path,
    per_class: dict[str, int],
    *,
    classes: int = len(CLASSES),
    seed: int = 0,
    min_size: int = 80,
    max_size: int = 160,
    sizes: Sequence[tuple[int, int]] = (),
    streams: int = 1,
    processes: int = 1,
    progress: str | None = None,
) -> dict[str, int]:
    """Write ``root/<split>/<NN>_<class>/<split>_<NN>_<index>.JPEG`` (quality 90): ``per_class[split]`` images of each
    of the first ``classes`` classes of :data:`CLASSES`; returns the number of files per split.

    Each image is drawn at a random size in [``min_size``, ``max_size``]; with ``sizes``, image ``i`` of class ``c``
    is then resized to ``sizes[(c * per_class[split] + i) % len(sizes)]`` (exact (W, H)). The images, in (split, class,
    index) order, are cut into ``streams`` contiguous runs, run ``k`` drawn from ``random.Random(seed + k)``: ``seed``
    and ``streams`` fix every file, and ``processes`` (at most ``streams``) only says how many processes write them.
    """
    root = Path(root)
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    jobs = [(split, c, i, n) for split, n in per_class.items() for c in range(classes) for i in range(n)]
    runs = [
        _Run(
            root,
            jobs[len(jobs) * k // streams : len(jobs) * (k + 1) // streams],
            seed + k,
            min_size,
            max_size,
            tuple(sizes),
            progress if streams == 1 else None,
        )
        for k in range(streams)
    ]
    if min(processes, streams) > 1:
        with Pool(min(processes, streams)) as pool:
            pool.map(_write_run, runs)
    else:
        for run in runs:
            _write_run(run)
    return {split: n * classes for split, n in per_class.items()}


def write_synthetic_imagenet(
    root: str | Path,
    train_per_class: int = 100,
    val_per_class: int = 20,
    seed: int = 0,
    min_size: int = 80,
    max_size: int = 160,
) -> Path:
    """Generate ``root/{train,val}/<class>/*.JPEG`` unless ``root`` already holds a generated set; returns ``root``.

    Deterministic for a given seed; written in one step with a manifest (:func:`mimlab.data.generated.write_generated`).
    Raises ``GeneratedDataError`` if ``root`` is a non-empty folder mimlab did not generate.
    """
    settings = dict(
        train_per_class=train_per_class, val_per_class=val_per_class, seed=seed, min_size=min_size, max_size=max_size
    )

    def render(folder: Path) -> dict[str, int]:
        return write_image_folder(
            folder,
            {"train": train_per_class, "val": val_per_class},
            seed=seed,
            min_size=min_size,
            max_size=max_size,
            progress=f"writing synthetic images to {root}",
        )

    return write_generated(root, "imagenet", settings, render, OWN_DATA_HINT)


class SyntheticImageNetDataModule(ImageNetDataModule):
    """:class:`ImageNetDataModule` over the embedded synthetic set, generated on first use (``prepare_data``, rank 0)
    into ``root``, which must be absent, empty or a set mimlab generated (checked here, before any data is read)."""

    def __init__(
        self, root: str, train_per_class: int = 100, val_per_class: int = 20, data_seed: int = 0, **kwargs
    ) -> None:
        super().__init__(root, **kwargs)
        check_generated_root(self.root, "imagenet", OWN_DATA_HINT)
        self.train_per_class = train_per_class
        self.val_per_class = val_per_class
        self.data_seed = data_seed

    def prepare_data(self) -> None:
        write_synthetic_imagenet(self.root, self.train_per_class, self.val_per_class, self.data_seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/synthetic/imagenet")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = write_synthetic_imagenet(args.root, args.train_per_class, args.val_per_class, args.seed)
    print(f"{len(CLASSES)} classes in {root}/train and {root}/val")


if __name__ == "__main__":
    main()
