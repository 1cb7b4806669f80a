"""Shared fixtures: a tiny synthetic ImageNet-layout folder and Hydra composition of conf/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mimlab.data.synthetic import write_synthetic_imagenet
from mimlab.train import CONFIG_DIR

torch.set_num_threads(min(2, os.cpu_count() or 1))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(name: str) -> Path:
    """``../shared/data/<name>`` (real public samples staged beside the checkout, never committed); skips the test
    when absent — or fails it when ``MIMLAB_REQUIRE_SHARED_DATA=1`` (set by ``.ci/run`` where the samples are staged),
    so a missing or renamed sample cannot turn the real-data tests into silent skips."""
    path = SHARED_DATA / name
    if not path.is_dir():
        reason = f"needs the real sample {path} (staged beside the checkout as ../shared/data/{name}); not present"
        if os.environ.get("MIMLAB_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason + ", and MIMLAB_REQUIRE_SHARED_DATA=1")
        pytest.skip(reason)
    return path


# Two DDP processes on the CPU (gloo, fp32, no compile or fused kernels), as the DDP tests launch them.
DDP_CPU_TWO_PROCESSES = [
    "hardware=ddp",
    "hardware.accelerator=cpu",
    "hardware.devices=2",
    "hardware.precision=32-true",
    "hardware.compile=false",
    "hardware.fused_optimizer=false",
    "hardware.matmul_precision=highest",
    "hardware.num_workers=0",
    "hardware.pin_memory=false",
    "+hardware.strategy.process_group_backend=gloo",
]

# Test sizes on top of a recipe's CPU scale (conf/tiny): the encoder of the tiny runs, a 32-d one-block ViT (any ViT
# recipe), with a 32-d MAE decoder; and the encoder of the learning checks, a 64-d two-block ViT.
TINY_VIT = ["model.backbone.embed_dim=32", "model.backbone.depth=1", "model.backbone.num_heads=2"]
TINY_MAE_DECODER = ["model.decoder.embed_dim=32", "model.decoder.num_heads=2"]
SMALL_VIT = ["model.backbone.embed_dim=64", "model.backbone.depth=2", "model.backbone.num_heads=2"]

# The tiny MAE most run-level tests train (a 32-d one-block ViT on 32-px crops, CSV logger, no worker processes), and
# the same without the callbacks that draw, probe or time (a test adds back what it checks).
TINY_MAE = [
    "experiment=mae_vit_tiny_synthetic",
    "data.img_size=32",
    "hardware.num_workers=0",
    "logger=csv",
    *TINY_VIT,
]
TINY_MAE_QUIET = [*TINY_MAE, "model.decoder.embed_dim=16", "model.decoder.num_heads=2", "debug=quiet"]

# The EMA-teacher CPU recipes at test size (with TINY_VIT): their decoders, teacher depth and mask clones.
TINY_EMA_TARGETS = {
    "data2vec2_vit_tiny_synthetic": [
        "data.img_size=32",
        "model.decoder.decoder_dim=32",
        "model.decoder.depth=1",
        "target.top_k=1",
        "masking.clones=2",
    ],
    "ijepa_vit_tiny_synthetic": ["data.img_size=64", "model.decoder.predictor_dim=16", "model.decoder.depth=1"],
}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """10 classes x (6 train, 2 val) small JPEGs in the ImageNet layout."""
    return write_synthetic_imagenet(
        tmp_path_factory.mktemp("synthetic"), train_per_class=6, val_per_class=2, min_size=64, max_size=96
    )


def compose_config(overrides: list[str], output_dir: Path | str = "/tmp/mimlab-test") -> DictConfig:
    """Compose conf/train.yaml like the CLI would, outside a Hydra run (no run dir)."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])
