"""Odd entries in an image folder: the walk never follows a folder link out of (or around) a class folder, never takes
a file twice, never opens a FIFO; every PIL mode decodes with its value range kept; ``mimlab.check`` says what it saw."""

from __future__ import annotations

import os
import shutil
import threading
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from conftest import TINY_MAE, compose_config
from mimlab.check import check
from mimlab.data.image_folder import CheckedImageFolder, CorruptImageError, load_rgb

CHECK = [*TINY_MAE, "model.decoder.embed_dim=16", "model.decoder.num_heads=2", "data.batch_size=8"]


def within(seconds: float, fn, *args):
    """``fn(*args)``, failing the test if it has not returned after ``seconds`` (a hang is a failure, not a stall)."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # re-raised in the test's thread
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.fixture
def data(tmp_path, synthetic_root) -> Path:
    """A copy of the synthetic set: 10 classes x 6 train images."""
    shutil.copytree(synthetic_root, tmp_path / "data")
    return tmp_path / "data"


def counts(dataset: CheckedImageFolder) -> dict[str, int]:
    return {c: sum(label == i for _, label in dataset.samples) for i, c in enumerate(dataset.classes)}


def test_folder_links_neither_loop_nor_multiply_nor_relabel(data):
    train = data / "train"
    links = {
        "00_circle/loop": "..",  # the whole split again, under 00_circle
        "00_circle/self": ".",
        "01_square/to_ring": "../03_ring",  # with the next one: a loop across classes
        "03_ring/to_square": "../01_square",
    }
    for link, target in links.items():
        os.symlink(target, train / link)
    dataset = within(30, CheckedImageFolder, train)
    assert set(counts(dataset).values()) == {6} and len(dataset) == 60
    for link in links:
        assert any(line.startswith(f"{train / link}: a link to the folder ") for line in dataset.skipped), link


def test_a_file_is_taken_once_and_only_under_its_own_class(data, tmp_path):
    from mimlab.data.image_folder import find_images

    train = data / "train"
    circle = sorted((train / "00_circle").glob("*.JPEG"))
    os.link(circle[0], train / "00_circle" / "hard_link.JPEG")
    os.symlink(circle[1], train / "00_circle" / "soft_link.JPEG")
    os.symlink(circle[2], train / "01_square" / "a_circle.JPEG")  # would relabel a circle as a square
    pool = tmp_path / "pool"
    pool.mkdir()
    shutil.copy(circle[3], pool / "extra.JPEG")
    os.symlink(pool / "extra.JPEG", train / "00_circle" / "from_pool.JPEG")  # a folder of links into a pool: kept
    samples, skipped = find_images(train, {c.name: i for i, c in enumerate(sorted(train.iterdir()))})
    circles = [p for p, label in samples if label == 0]
    assert len(circles) == 7 and len({os.stat(p).st_ino for p in circles}) == 7  # 6 files + the pool's, each once
    assert sum(label == 1 for _, label in samples) == 6
    assert sum(": the same file as " in line for line in skipped) == 2  # the hard and the soft link (or the originals)
    assert any(f"a_circle.JPEG: a link to {circle[2]}, an image of another class folder" in line for line in skipped)


def test_a_fifo_named_like_an_image_is_never_opened(data, tmp_path):
    fifo = data / "train" / "00_circle" / "x.JPEG"
    os.mkfifo(fifo)
    os.symlink("..", data / "train" / "02_triangle" / "loop")
    dataset = within(30, CheckedImageFolder, data / "train")
    assert len(dataset) == 60 and f"{fifo}: not a regular file" in " ".join(dataset.skipped)
    with pytest.raises(CorruptImageError, match=rf"{fifo}: not a regular file"):
        within(10, load_rgb, fifo)
    out = StringIO()
    cfg = compose_config([*CHECK, f"data.root={data}"], tmp_path / "run")
    assert within(120, check, cfg, Console(file=out, width=400)) is True
    text = out.getvalue()
    assert f"left out (train): {fifo}: not a regular file" in text
    assert f"left out (train): {data / 'train' / '02_triangle' / 'loop'}: a link to the folder" in text
    assert "total" in text and " 60 " in text  # 10 classes x 6, not multiplied


RAMP = np.linspace(0, 1, 64 * 64).reshape(64, 64)


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("F", RAMP.astype(np.float32), RAMP * 255),  # a float TIFF in 0..1: not all black
        ("F", (RAMP * 255).astype(np.float32), RAMP * 255),
        ("F", (RAMP * 4 - 2).astype(np.float32), RAMP * 255),  # any other range: its min..max
        ("I;16", (RAMP * 65535).astype(np.uint16), RAMP * 255),  # 16-bit: over 0..65535, not clipped at 255
        ("I", (RAMP * 65535).astype(np.int32), RAMP * 255),
        ("I", (RAMP * 200).astype(np.int32), np.floor(RAMP * 200)),  # 8-bit values in a 32-bit image
    ],
    ids=["float-0..1", "float-0..255", "float-other", "16-bit", "int32-16-bit", "int32-8-bit"],
)
def test_high_range_images_keep_their_range(tmp_path, mode, values, expected):
    path = tmp_path / "x.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == mode
    rgb = np.asarray(load_rgb(path)).astype(float)
    assert np.abs(rgb[..., 0] - expected).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()


def test_a_lab_image_decodes_to_its_colour(tmp_path):
    Image.new("LAB", (8, 8), (128, 128, 128)).save(tmp_path / "x.tif")  # L* 50, a* = b* = 0: mid grey
    pixel = np.asarray(load_rgb(tmp_path / "x.tif"))[0, 0]
    assert np.abs(pixel.astype(int) - 119).max() <= 2, pixel


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("La", (8, 8), (100, 255)), (100, 100, 100)),
        (Image.new("RGBa", (8, 8), (10, 20, 30, 128)), (19, 39, 59)),
    ],
    ids=["La", "RGBa"],
)
def test_premultiplied_alpha_is_undone(image, expected):
    from mimlab.data.image_folder import to_rgb

    assert tuple(np.asarray(to_rgb(image))[0, 0]) == expected


def test_check_names_high_range_modes_and_flat_images(data, tmp_path):
    Image.fromarray(RAMP.astype(np.float32)).save(data / "train" / "00_circle" / "float.tif")
    Image.new("RGB", (64, 64)).save(data / "train" / "01_square" / "black.png")
    out = StringIO()
    cfg = compose_config([*CHECK, f"data.root={data}"], tmp_path / "run")
    assert check(cfg, Console(file=out, width=400)) is True
    text = out.getvalue()
    assert "F 1 (32-bit float: scaled to 8 bit)" in text
    assert f"flat image (train): {data / 'train' / '01_square' / 'black.png'}: every pixel is 0" in text
    assert "float.tif" not in text  # scaled, so not flat
