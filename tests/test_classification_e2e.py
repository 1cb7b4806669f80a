"""The pretrain -> linear-probe -> fine-tune chain on the embedded synthetic data (tiny, CPU), and the online monitors."""

from pathlib import Path

import pytest
import torch

from conftest import SMALL_VIT, TINY_MAE_DECODER, compose_config
from mimlab.data.synthetic import write_synthetic_imagenet
from mimlab.train import build

CHANCE = 10.0  # 10 balanced classes
COMMON = [
    "hardware.num_workers=0",
    "logger=csv",
    "~callbacks.progress",
    "~callbacks.throughput",
    "data.img_size=32",
    *SMALL_VIT,
]


@pytest.fixture(scope="module")
def chain_root(tmp_path_factory) -> Path:
    """10 classes x (24 train, 8 val) small images."""
    return write_synthetic_imagenet(
        tmp_path_factory.mktemp("chain"), train_per_class=24, val_per_class=8, min_size=36, max_size=48
    )


def _fit(overrides, out):
    cfg = compose_config(overrides, out)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


@pytest.fixture(scope="module")
def pretrained(chain_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    _, trainer = _fit(
        [
            "experiment=mae_vit_tiny_synthetic",
            f"data.root={chain_root}",
            "data.batch_size=48",
            "trainer.max_epochs=3",
            "optim.warmup_epochs=1",
            "callbacks=pretrain_with_probes",
            "~callbacks.reconstruction",
            *TINY_MAE_DECODER,
            *COMMON,
        ],
        out,
    )
    metrics = trainer.callback_metrics
    assert {"knn/acc1", "probe/val_acc1", "probe/train_acc1"} <= set(metrics)
    assert float(metrics["knn/acc1"]) > CHANCE + 20  # the kNN monitor sees the class structure
    return Path(trainer.checkpoint_callback.last_model_path)


@pytest.mark.slow
def test_linear_probe_from_pretrain_checkpoint_beats_chance(pretrained, chain_root, tmp_path):
    module, trainer = _fit(
        [
            "experiment=linprobe_vit_tiny_synthetic",
            f"task.pretrained={pretrained}",
            f"data.root={chain_root}",
            "data.batch_size=48",
            "trainer.max_epochs=4",
            *COMMON,
        ],
        tmp_path,
    )
    sd = torch.load(pretrained, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(
        module.backbone.blocks[0].attn.qkv.weight, sd["backbone.blocks.0.attn.qkv.weight"]
    )  # frozen + loaded
    acc = float(trainer.callback_metrics["val/acc1"])
    assert acc > CHANCE + 25, acc  # measured 47.5 (kNN on the same features ~51)
    assert Path(trainer.checkpoint_callback.best_model_path).is_file()


@pytest.mark.slow
def test_finetune_from_pretrain_checkpoint_beats_chance(pretrained, chain_root, tmp_path):
    module, trainer = _fit(
        [
            "experiment=finetune_vit_tiny_synthetic",
            f"task.pretrained={pretrained}",
            f"data.root={chain_root}",
            "data.batch_size=48",
            "trainer.max_epochs=4",
            *COMMON,
        ],
        tmp_path,
    )
    metrics = trainer.callback_metrics
    acc = float(metrics["val/acc1"])
    assert "val/acc1_raw" in metrics and "val/acc5" in metrics
    assert acc > CHANCE + 15, acc  # measured 35 after 4 epochs with mixup/cutmix/RandAugment/erasing on 240 images
