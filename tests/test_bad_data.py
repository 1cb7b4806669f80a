"""Bad data files get a message naming the file, and data.on_corrupt=skip holds wherever images are read."""

from __future__ import annotations

import shutil
from io import StringIO
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from conftest import TINY_MAE, compose_config
from mimlab.check import check
from mimlab.data.image_folder import CheckedImageFolder, CorruptImageError
from mimlab.train import build

TINY = [
    *TINY_MAE,
    "model.decoder.embed_dim=16",
    "model.decoder.num_heads=2",
    "~callbacks.progress",
    "~callbacks.reconstruction",
    "~callbacks.dashboard",
    "~callbacks.throughput",
    "data.batch_size=8",
]


@pytest.fixture(scope="session")
def bomb(tmp_path_factory) -> Path:
    """A 24 kB PNG of 14000 x 14000 pixels: above PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (14000, 14000)).save(path, optimize=True)
    return path


@pytest.fixture
def data_with(tmp_path, synthetic_root):
    """A copy of the synthetic set with ``files`` ({relative path: source file or bytes}) added to it."""

    def make(files: dict[str, Path | bytes]) -> Path:
        root = tmp_path / "data"
        shutil.copytree(synthetic_root, root)
        for rel, content in files.items():
            (root / rel).write_bytes(content if isinstance(content, bytes) else content.read_bytes())
        return root

    return make


def test_decompression_bomb_is_a_corrupt_image_named_by_its_path(data_with, bomb):
    root = data_with({"train/00_circle/bomb.png": bomb})
    bomb_path = root / "train" / "00_circle" / "bomb.png"
    strict = CheckedImageFolder(root / "train", on_corrupt="fail")
    index = [p for p, _ in strict.samples].index(str(bomb_path))
    with pytest.raises(
        CorruptImageError, match=rf"cannot decode image {bomb_path}: .*decompression bomb.*data\.on_corrupt=skip"
    ):
        strict[index]
    lenient = CheckedImageFolder(root / "train", on_corrupt="skip")
    image, label = lenient[index]  # the next readable image instead
    assert image.size[0] < 14000 and label == 0


def test_check_lists_a_decompression_bomb_as_unreadable(data_with, bomb, tmp_path):
    root = data_with({"train/00_circle/bomb.png": bomb})
    out = StringIO()
    cfg = compose_config([*TINY, f"data.root={root}"], tmp_path / "run")
    assert check(cfg, Console(file=out, width=300)) is False
    assert f"unreadable: cannot decode image {root}/train/00_circle/bomb.png" in out.getvalue()


def test_check_reports_a_missing_split_as_a_message(tmp_path, synthetic_root):
    root = tmp_path / "only_train"
    shutil.copytree(synthetic_root / "train", root / "train")
    out = StringIO()
    cfg = compose_config([*TINY, "data=imagenet", f"data.root={root}"], tmp_path / "run")
    assert check(cfg, Console(file=out, width=300)) is False
    text = out.getvalue()
    assert f"data folder {root}/val does not exist" in text and "Traceback" not in text


def test_knn_monitor_reads_train_with_the_runs_on_corrupt_policy(data_with, tmp_path):
    root = data_with({"train/00_circle/broken.JPEG": b"not a jpeg", "val/01_square/broken.JPEG": b"\xff\xd8 nope"})
    cfg = compose_config(
        [
            *TINY,
            f"data.root={root}",
            "data.on_corrupt=skip",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "callbacks.knn.every_n_epochs=1",
        ],
        tmp_path / "run",
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert 0 <= float(trainer.callback_metrics["knn/acc1"]) <= 100
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> Path:
    from mimlab.data.synthetic_dense import write_coco

    return write_coco(tmp_path_factory.mktemp("coco") / "coco", num_train=4, num_val=2, size=32)


def coco_with(tmp_path: Path, source: Path, edit) -> Path:
    """A copy of ``source`` whose train json is replaced by ``edit(json dict)`` (a dict) or ``edit`` (a string)."""
    import json

    root = tmp_path / "coco"
    shutil.copytree(source, root)
    path = root / "annotations" / "instances_train2017.json"
    text = edit if isinstance(edit, str) else json.dumps(edit(json.loads(path.read_text())))
    path.write_text(text)
    return root


def test_malformed_coco_json_names_the_file_and_position(tmp_path, coco_set):
    from mimlab.data.coco import COCOInstances

    root = coco_with(tmp_path, coco_set, '{"images": [{"id": 1,}]')
    with pytest.raises(
        ValueError, match=r"instances_train2017\.json is not valid JSON \(line 1, column 22: Expecting property name"
    ):
        COCOInstances(root, "train")


def test_invalid_polygon_names_the_annotation(tmp_path, coco_set):
    from mimlab.data.coco import COCOInstances

    def break_polygon(data):
        data["annotations"][1]["segmentation"] = [[3.0, 4.0, 10.0, 4.0]]
        return data

    root = coco_with(tmp_path, coco_set, break_polygon)
    with pytest.raises(
        ValueError,
        match=r"instances_train2017\.json: annotation 2 \(image 1\) has an invalid polygon "
        r"\[3\.0, 4\.0, 10\.0, 4\.0\]: a polygon is a flat list",
    ):
        COCOInstances(root, "train")


def test_coco_without_annotations_is_refused_at_setup(tmp_path, coco_set):
    from mimlab.data.coco import COCODataModule

    root = coco_with(tmp_path, coco_set, lambda data: {**data, "annotations": []})
    with pytest.raises(ValueError, match=r"instances_train2017\.json has an empty 'annotations' list.*mAP"):
        COCODataModule(str(root)).setup("fit")


def test_coco_of_crowd_regions_only_is_refused_at_setup(tmp_path, coco_set):
    from mimlab.data.coco import COCODataModule

    def all_crowd(data):
        return {**data, "annotations": [{**a, "iscrowd": 1} for a in data["annotations"]]}

    root = coco_with(tmp_path, coco_set, all_crowd)
    with pytest.raises(
        ValueError, match=r"instances_train2017\.json: all \d+ annotations are crowd regions \(iscrowd=1\).*mAP"
    ):
        COCODataModule(str(root)).setup("fit")


def test_coco_image_size_that_differs_from_the_json_names_the_file_and_image(tmp_path, coco_set):
    from mimlab.data.coco import COCOInstances

    def wrong_size(data):
        data["images"][1]["width"] += 8
        return data

    root = coco_with(tmp_path, coco_set, wrong_size)
    dataset = COCOInstances(root, "train")
    index = [im["id"] for im in dataset.images].index(2)
    info = dataset.images[index]
    with pytest.raises(
        ValueError,
        match=rf"instances_train2017\.json: image 2 \(.*{info['file_name']}\) is 32x32 pixels but the json gives "
        rf"width 40, height 32.*Fix the image's width/height in the json",
    ):
        dataset[index]
