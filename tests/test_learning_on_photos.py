"""Learning checks on real photos, per pre-training method family (MAE's, FCMAE's and data2vec 2.0's): a short
pre-training of the method's own CPU recipe on CIFAR-10 photos (the staged ``cifar10_slice``), then the representation
check (kNN and a linear probe on frozen features, :mod:`mimlab.evaluation.representation`) of the encoder it wrote
against the same architecture with random init. A method whose loss falls while its features stay at random-init quality fails here.

The full protocol (9,000 photos, 700 steps) is experiments/compare_methods; these checks are the same recipe on a
2,000-photo subset for fewer steps, with margins set well inside what that budget measured (printed with ``-s``).

Families without a check, measured at the budget a CI run affords (2026-12-06, seed 0, 186 steps, 2 shared cores):
their margin over random init was under 3 points on both measures, too close to noise for a check.
MaskFeat (mask token, HOG target): kNN 26.2 vs 25.8, probe 32.2 vs 30.2. Img2Vec (random teacher features): kNN 26.0
vs 25.8, probe 30.2 vs 30.2. iTPN (HiViT, pixels): kNN 24.6 vs 23.6, probe 22.8 vs 24.0. data2vec 2.0 was as close at
186 steps (kNN 24.6 vs 23.6, probe 26.6 vs 25.4) and clears the probe at 620 (below), so the EMA-teacher family has
its check at that budget. SimMIM (+1.8 kNN, +3.6 probe at the full protocol, the smallest of the methods that learn
there) was not measured here. I-JEPA learns measurably only with ~2,100 steps on 9,000 photos
(experiments/compare_methods/README.md), far beyond a CI budget.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import compose_config, shared_data
from mimlab.checkpoints.encoder import checkpoint_encoder
from mimlab.eval import PooledEncoder
from mimlab.evaluation.representation import Protocol, evaluate_encoders
from mimlab.train import run

pytestmark = pytest.mark.slow
TRAIN_PER_CLASS, VAL_PER_CLASS = 200, 50
SHARED = [
    "data=imagenet",
    "data.img_size=64",
    "data.batch_size=64",
    "optim.warmup_epochs=1",
    "logger=csv",
    "hardware.num_workers=1",
    "~callbacks.progress",
    "~callbacks.knn",
    "~callbacks.reconstruction",
    "~callbacks.target_maps",
    "~callbacks.throughput",
    "+trainer.num_sanity_val_steps=0",
    "trainer.limit_val_batches=1",
]
# family -> (recipe, epochs over the 2,000 photos (31 steps each), minimum kNN and probe margins over random init).
# Measured (2026-12-06, seed 0): MAE (372 steps) kNN 30.2 vs 25.8, probe 40.2 vs 30.2; FCMAE (248 steps) kNN 26.4 vs
# 22.4, probe 31.8 vs 28.0, 22 min on 2 shared cores (about 11 on 2 free ones); data2vec 2.0 (620 steps, 2026-12-07)
# kNN 25.4 vs 23.6, probe 31.8 vs 25.4 (15 min on one shared core). The margins asked are about half.
# FCMAE runs at SHARED's 64 px and batch 64 (its recipe: 96 px, batch 32), so its 32-px mask units are a 2x2 grid, as in
# the full protocol.
FAMILIES = {
    "pixels, visible tokens only (MAE)": ("mae_vit_tiny_synthetic", 12, 2.0, 5.0),
    "pixels, ConvNeXt (FCMAE)": ("fcmae_convnextv2_atto_synthetic", 8, 2.0, 1.9),
    "EMA teacher features (data2vec 2.0)": ("data2vec2_vit_tiny_synthetic", 20, 0.8, 3.0),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The first 200 training and 50 validation photos of each CIFAR-10 class, in the ImageNet layout."""
    source, root = shared_data("cifar10_slice"), tmp_path_factory.mktemp("photos")
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for folder in sorted((source / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretraining_on_photos_beats_random_init(family, photos, tmp_path):
    recipe, epochs, knn_margin, probe_margin = FAMILIES[family]
    torch.set_num_threads(2)
    cfg = compose_config(
        [f"experiment={recipe}", f"data.root={photos}", f"trainer.max_epochs={epochs}", *SHARED], tmp_path
    )
    run(cfg)
    encoder = checkpoint_encoder(tmp_path / "checkpoints" / "last.ckpt")
    encoders = {"trained": PooledEncoder(encoder.backbone), "random init": PooledEncoder(encoder.fresh(cfg.seed))}
    results = evaluate_encoders(encoders, photos, Protocol(img_size=cfg.data.img_size, probe_epochs=50))
    trained, random = results["trained"], results["random init"]
    print(f"{family}: kNN {trained['knn_top1']:.1f} vs {random['knn_top1']:.1f}, probe {trained['probe_top1']:.1f} "
          f"vs {random['probe_top1']:.1f}")  # fmt: skip
    assert trained["knn_top1"] > random["knn_top1"] + knn_margin, results
    assert trained["probe_top1"] > random["probe_top1"] + probe_margin, results
