"""ImageNet-layout DataModule on the synthetic set, on real ImageNet samples, and its errors on bad input."""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import shared_data
from mimlab.data.image_folder import CorruptImageError, DataLayoutError
from mimlab.data.imagenet import ImageNetDataModule
from mimlab.data.synthetic import CLASSES


def make_dm(root, **kw):
    kw = {"batch_size": 4, "img_size": 32, "num_workers": 0, "pin_memory": False, **kw}
    dm = ImageNetDataModule(str(root), **kw)
    dm.setup("fit")
    return dm


def test_synthetic_set_has_imagenet_layout(synthetic_root):
    for split, n in (("train", 6), ("val", 2)):
        folders = sorted(p.name for p in (synthetic_root / split).iterdir())
        assert len(folders) == len(CLASSES)
        assert all(len(list((synthetic_root / split / f).glob("*.JPEG"))) == n for f in folders)
    img = Image.open(next((synthetic_root / "train").rglob("*.JPEG")))
    assert img.format == "JPEG" and img.mode == "RGB" and 64 <= min(img.size) <= 96


def test_train_crops_travel_as_uint8_and_are_normalised_on_transfer_exactly_like_totensor_normalize(synthetic_root):
    from torchvision import transforms as T

    from mimlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    dm = make_dm(synthetic_root)
    raw, labels = next(iter(dm.train_dataloader()))
    assert raw.shape == (4, 3, 32, 32) and raw.dtype == torch.uint8
    assert labels.max() < 10 and dm.num_classes == 10
    images, same_labels = dm.on_after_batch_transfer([raw, labels], 0)
    assert images.dtype == torch.float32 and same_labels is labels
    official = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # what the MAE workers compute
    expected = torch.stack([official(Image.fromarray(crop.permute(1, 2, 0).numpy())) for crop in raw])
    assert torch.equal(images, expected)
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 32, 32)


def test_reads_real_imagenet_samples():
    dm = make_dm(shared_data("imagenet_sample"), img_size=64)
    assert dm.num_classes == 100 and dm.train_set.classes[0] == "n01440764"
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 64, 64)


def test_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(DataLayoutError, match=r"does not exist.*data\.root"):
        make_dm(tmp_path / "nowhere")


def test_images_directly_under_train(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a.JPEG")
    with pytest.raises(DataLayoutError, match=r"directly.*a\.JPEG.*one sub-folder per class"):
        make_dm(tmp_path)


def test_empty_class_folder_is_named(tmp_path, synthetic_root):
    shutil.copytree(synthetic_root, tmp_path / "d")
    (tmp_path / "d" / "train" / "zz_empty").mkdir()
    with pytest.raises(DataLayoutError, match="zz_empty"):
        make_dm(tmp_path / "d")


def _with_corrupt_file(tmp_path, synthetic_root) -> Path:
    root = tmp_path / "d"
    shutil.copytree(synthetic_root, root)
    bad = sorted((root / "train" / "00_circle").glob("*.JPEG"))[0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    return bad


def test_corrupt_jpeg_fails_with_file_name_by_default(tmp_path, synthetic_root):
    bad = _with_corrupt_file(tmp_path, synthetic_root)
    dm = make_dm(tmp_path / "d")
    index = [p for p, _ in dm.train_set.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match=rf"{bad.name}.*on_corrupt=skip"):
        dm.train_set[index]


def test_corrupt_jpeg_is_skipped_on_request(tmp_path, synthetic_root):
    bad = _with_corrupt_file(tmp_path, synthetic_root)
    dm = make_dm(tmp_path / "d", on_corrupt="skip")
    index = [p for p, _ in dm.train_set.samples].index(str(bad))
    image, label = dm.train_set[index]
    assert image.shape == (3, 32, 32)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_other_colour_modes_are_converted_to_rgb(tmp_path, mode):
    (tmp_path / "train" / "c").mkdir(parents=True)
    (tmp_path / "val" / "c").mkdir(parents=True)
    img = Image.new(mode, (40, 40))
    ext = "jpg" if mode in ("L", "CMYK") else "png"
    for split in ("train", "val"):
        img.save(tmp_path / split / "c" / f"x.{ext}")
    dm = make_dm(tmp_path, batch_size=1)
    assert dm.train_set[0][0].shape == (3, 32, 32)


def test_check_reports_every_unreadable_file_at_once(tmp_path, synthetic_root):
    from io import StringIO

    from rich.console import Console

    from conftest import compose_config
    from mimlab.check import check

    root = tmp_path / "d"
    shutil.copytree(synthetic_root, root)
    bad = [sorted((root / "train" / c).glob("*.JPEG"))[0] for c in ("00_circle", "03_ring")]
    for path in bad:
        path.write_bytes(b"not a jpeg")
    cfg = compose_config(
        ["experiment=mae_vit_tiny_synthetic", f"data.root={root}", "data.img_size=32", "model.backbone.depth=1"],
        tmp_path / "run",
    )
    out = StringIO()
    assert check(cfg, Console(file=out, width=200)) is False
    text = out.getvalue()
    assert all(p.name in text for p in bad) and "2 unreadable file(s)" in text
    assert "01_square" in text and "total" in text
