"""COCO / ADE20K readers on the embedded synthetic sets and (when present) the staged shared samples."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_data
from mimlab.data.ade20k import ADE20KDataModule, ADE20KSegmentation, reduce_zero_label
from mimlab.data.coco import COCODataModule, COCOInstances, lsj_transforms
from mimlab.data.synthetic_dense import write_ade20k, write_coco
from mimlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MEAN_PIXEL


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"), num_train=8, num_val=8, size=64, seed=0)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return write_ade20k(tmp_path_factory.mktemp("ade"), num_train=4, num_val=2, size=64, seed=0)


def test_coco_sample_fields_and_label_mapping(coco_root):
    ds = COCOInstances(coco_root, "val", lsj_transforms(64, train=False), keep_crowd=True)
    assert ds.num_classes == 3 and ds.cat_id_to_label == {1: 1, 3: 2, 5: 3}  # non-contiguous ids → 1..C
    image, target = ds[3]  # every 4th image carries a crowd region
    k = len(target["labels"])
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].shape == (k, 4) and target["masks"].shape == (k, 64, 64)
    assert set(target["labels"].tolist()) <= {1, 2, 3}
    assert target["iscrowd"].sum() == 1
    # boxes are XYXY and enclose their masks
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box[0] <= xs.min() + 1 and box[2] >= xs.max() and box[1] <= ys.min() + 1 and box[3] >= ys.max()


def test_coco_polygon_and_rle_decode_match_areas(coco_root):
    ds = COCOInstances(coco_root, "val", keep_crowd=True)
    anns = [a for i in range(len(ds)) for a in ds.anns_by_image[ds.images[i]["id"]]]
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and isinstance(crowd[0]["segmentation"]["counts"], list)  # uncompressed RLE
    for i in range(len(ds)):
        target = ds.load_target(i)
        areas = target["masks"].flatten(1).sum(1).float()
        # RLE crowd masks decode exactly; polygons rasterise within a pixel border of the PIL rendering
        torch.testing.assert_close(areas[target["iscrowd"] == 1], target["area"][target["iscrowd"] == 1])
        poly = target["iscrowd"] == 0
        assert torch.allclose(areas[poly], target["area"][poly], rtol=0.35, atol=8)


def test_coco_training_drops_crowd_and_lsj_gives_fixed_size(coco_root):
    ds = COCOInstances(coco_root, "train", lsj_transforms(64, scale_range=(0.5, 1.5)), keep_crowd=False)
    n_crowd = sum(a["iscrowd"] for anns in ds.anns_by_image.values() for a in anns)
    assert n_crowd > 0
    for i in range(4):
        image, target = ds[i]
        assert image.shape == (3, 64, 64)
        assert "iscrowd" not in target and len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
        b = target["boxes"]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 0] >= 0).all() and (b[:, 2] <= 64).all()


def test_lsj_canvas_puts_the_image_top_left_on_the_evaluation_padding(coco_root):
    """A training canvas looks like an evaluation input: the rescaled image at the top-left, the rest the mean pixel,
    which the detector's normalisation turns into the 0 its own evaluation padding has (a black pad at a random
    offset taught the detector to fire on the edge between image and the grey evaluation padding)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    ds = COCOInstances(coco_root, "train", lsj_transforms(64, scale_range=(0.5, 0.5)))  # 64-px images -> 32 px
    normalise = GeneralizedRCNNTransform(64, 64, IMAGENET_MEAN, IMAGENET_STD).normalize
    for i in range(4):
        image, target = ds[i]
        assert image.shape == (3, 64, 64)
        pad = torch.ones(64, 64, dtype=torch.bool)
        pad[:32, :32] = False
        expected = torch.tensor(MEAN_PIXEL, dtype=torch.float32)[:, None] / 255
        torch.testing.assert_close(image[:, pad], expected.expand(3, int(pad.sum())))
        assert normalise(image)[:, pad].abs().max() < 0.01
        assert not target["masks"][:, pad].any() and (target["boxes"][:, 2:] <= 32).all()


def test_coco_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json"):
        COCOInstances(tmp_path, "val")


def test_coco_image_in_json_but_absent(coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    name = json.loads((root / "annotations" / "instances_val2017.json").read_text())["images"][2]["file_name"]
    (root / "val2017" / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        COCOInstances(root, "val")


def test_coco_datamodule_generates_embedded_set(tmp_path):
    dm = COCODataModule(str(tmp_path / "gen"), batch_size=2, generate_if_missing=True)
    dm.setup()
    images, targets = next(iter(dm.val_dataloader()))
    assert len(images) == len(targets) == 2 and dm.num_classes == 3


def test_reduce_zero_label_convention():
    raw = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(raw), [[255, 0, 1], [149, 255, 6]])


def test_ade_bad_label_values(ade_root, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(ade_root, root)
    label = next((root / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))
    arr = np.asarray(Image.open(label)).copy()
    arr[0, 0] = 200
    Image.fromarray(arr, mode="L").save(label)
    ds = ADE20KSegmentation(root, "validation")
    idx = [p.stem for p in ds.images].index(label.stem)
    with pytest.raises(ValueError, match=r"200.*outside 0\.\.150"):
        ds[idx]


def test_ade_train_crops_and_val_full_labels(ade_root):
    dm = ADE20KDataModule(str(ade_root), img_size=32, batch_size=2)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 32, 32) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= set(range(150)) | {255}
    images, labels = next(iter(dm.val_dataloader()))
    assert images[0].shape == (3, 32, 32) and labels[0].shape == (64, 64)  # val image resized, label kept


def test_shared_coco_tiny():
    ds = COCOInstances(shared_data("coco_tiny"), "val", keep_crowd=True)
    assert len(ds) == 80 and ds.num_classes == 80 and ds.cat_id_to_label[90] == 80
    crowd_images = [i for i, im in enumerate(ds.images) if any(a["iscrowd"] for a in ds.anns_by_image[im["id"]])]
    target = ds.load_target(crowd_images[0])
    crowd = target["iscrowd"] == 1
    areas = target["masks"].flatten(1).sum(1).float()
    torch.testing.assert_close(areas[crowd], target["area"][crowd], rtol=0.02, atol=2.0)  # uncompressed RLE
    assert torch.allclose(areas[~crowd], target["area"][~crowd], rtol=0.2, atol=30)  # polygons


def test_shared_ade20k_sample():
    ds = ADE20KSegmentation(shared_data("ade20k_sample"), "validation")
    assert len(ds) == 3
    label = ds.load_label(0)  # ADE_val_00000001: raw labels [0, 1, 2, 3, 5, 7, 10, 18]
    assert sorted(label.unique().tolist()) == [0, 1, 2, 4, 6, 9, 17, 255]


def test_synthetic_dense_cli_writes_both_layouts(tmp_path):
    from mimlab.data.synthetic_dense import main

    main(["--root", str(tmp_path), "--size", "32"])
    coco = json.loads((tmp_path / "coco" / "annotations" / "instances_train2017.json").read_text())
    assert len(coco["images"]) == 32 and {c["id"] for c in coco["categories"]} == {1, 3, 5}
    assert all((tmp_path / "coco" / "train2017" / im["file_name"]).is_file() for im in coco["images"])
    labels = sorted((tmp_path / "ade20k" / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))
    assert len(labels) == 8 and Image.open(labels[0]).mode == "L" and np.asarray(Image.open(labels[0])).max() <= 150
