"""The fast data paths: WebDataset shards (mimlab.data.shards) and device-side JPEG decode (mimlab.data.gpu_decode)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from conftest import TINY_MAE_DECODER, TINY_VIT, compose_config
from mimlab.data.gpu_decode import DeviceTransform, GPUDecodeImageNetDataModule, random_resized_crop_box
from mimlab.data.shards import ShardedImageNetDataModule, write_shards
from mimlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def shards(synthetic_root, tmp_path_factory):
    dst = tmp_path_factory.mktemp("shards")
    metas = {split: write_shards(synthetic_root, dst, split, shard_size=16) for split in ("train", "val")}
    return dst, metas


def test_shards_hold_every_image_once_with_imagefolder_labels(synthetic_root, shards):
    dst, metas = shards
    folder = ImageFolder(synthetic_root / "train")
    assert metas["train"]["classes"] == folder.classes and metas["train"]["count"] == len(folder) == 60
    assert len(metas["train"]["shards"]) == 4  # 60 samples / 16 per shard
    module = ShardedImageNetDataModule(str(dst), batch_size=10, img_size=32, num_workers=0, pin_memory=False)
    module.setup()
    labels = sorted(module.val_set.read(i)[1] for i in range(len(module.val_set)))
    assert labels == sorted(label for _, label in ImageFolder(synthetic_root / "val").samples)
    originals = {
        p.read_bytes(): label for p, label in ((Path(p), y) for p, y in ImageFolder(synthetic_root / "train").samples)
    }
    read = [module.train_set.read(i) for i in range(len(module.train_set))]  # the tar index finds the exact JPEG bytes
    assert len({data for data, _ in read}) == 60 and all(originals[data] == label for data, label in read)


def test_sharded_loader_gives_full_normalised_batches_each_epoch(shards):
    dst, _ = shards
    module = ShardedImageNetDataModule(str(dst), batch_size=8, img_size=32, num_workers=0, pin_memory=False)
    for _ in range(2):
        batches = list(module.train_dataloader())
        assert len(batches) == 60 // 8
        assert all(x.shape == (8, 3, 32, 32) and y.shape == (8,) for x, y in batches)
    assert len(module.val_set) == 20 and module.val_set[0][0].shape == (3, 32, 32)


def test_missing_shards_name_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="make shards"):
        ShardedImageNetDataModule(str(tmp_path)).setup()


def test_rrc_box_respects_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(90, 120, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
        assert 0.2 * 0.9 <= h * w / (90 * 120) <= 1.0 + 1e-9


def test_device_eval_transform_matches_torchvision_on_tensors(synthetic_root):
    path = sorted((synthetic_root / "val").rglob("*.JPEG"))[0]
    data = read_file(str(path))
    ours = DeviceTransform(32, train=False)([data], torch.device("cpu"))[0]
    image = decode_jpeg(data, mode=ImageReadMode.RGB)
    reference = T.Compose(
        [
            T.Resize(round(32 / (224 / 256)), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(32),
            T.ConvertImageDtype(torch.float32),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    torch.testing.assert_close(ours, reference(image), atol=0.03, rtol=0)  # uint8 rounding in torchvision


def test_gpu_decode_datamodule_feeds_the_trainer_hook_path_from_worker_processes(synthetic_root):
    """Worker processes and an ImageNet-size batch: a list of per-file byte tensors ran out of file descriptors."""
    cfg = compose_config(
        [
            "data=imagenet_gpu_decode",
            f"data.root={synthetic_root}",
            "data.img_size=32",
            "data.batch_size=24",
            "hardware.num_workers=2",
        ]
    )
    from hydra.utils import instantiate

    module = instantiate(cfg.data)
    assert isinstance(module, GPUDecodeImageNetDataModule)
    module.setup("fit")
    batches = iter(module.train_dataloader())
    for _ in range(2):  # one batch from each worker
        flat, sizes, labels, seeds = next(batches)
    assert flat.dtype == torch.uint8 and flat.numel() == int(sizes.sum()) and len(sizes) == len(labels) == 24
    assert len(set(seeds.tolist())) == 24
    images, labels = module.transfer_batch_to_device((flat, sizes, labels, seeds), torch.device("cpu"), 0)
    assert images.shape == (24, 3, 32, 32) and images.dtype == torch.float32
    again, _ = module.transfer_batch_to_device((flat, sizes, labels, seeds), torch.device("cpu"), 0)
    assert torch.equal(images, again)  # each image's crop and flip follow its own seed
    assert -2.2 < images.min() and images.max() < 2.7  # ImageNet-normalised range
    assert module.val_set[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("data", ["imagenet_gpu_decode", "imagenet_shards"])
def test_pretraining_fits_on_the_fast_data_options(data, synthetic_root, shards, tmp_path):
    import warnings

    from mimlab.train import build

    root = shards[0] if data == "imagenet_shards" else synthetic_root
    cfg = compose_config(
        [
            "experiment=mae_vit_tiny_synthetic",
            f"data={data}",
            f"data.root={root}",
            "logger=none",
            "data.img_size=32",
            "data.batch_size=4",
            "hardware.num_workers=0",
            *TINY_VIT,
            *TINY_MAE_DECODER,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "~callbacks.progress",
            "~callbacks.throughput",
            "~callbacks.lr_monitor",
        ],
        output_dir=tmp_path,
    )
    datamodule, module, trainer = build(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert trainer.checkpoint_callback.last_model_path and any((tmp_path / "reconstructions").iterdir())
