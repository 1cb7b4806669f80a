"""Adding a backbone family and a method touches no shared file: a toy backbone and a toy decoder in a module of their
own (tests/toy_parts.py) and three new configs in a folder of their own (found through ``hydra.searchpath``) train
through ``mimlab.train`` like any recipe: the contract is checked when the task is built, the loader delivers the
masks, the loss falls, a checkpoint is written, and a linear probe loads the toy encoder from it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import compose_config
from mimlab.models.backbones.contract import BackboneContractError
from mimlab.train import run

BACKBONE = """\
_target_: tests.toy_parts.ToyConvBackbone
width: 16
"""
DECODER = """\
_target_: tests.toy_parts.ToyPixelDecoder.attach
_partial_: true
"""
METHOD = """\
# @package _global_
defaults:
  - /tiny: pretrain
  - override /model/backbone: toy_conv
  - override /model/decoder: toy_pixels
  - override /target: norm_pix
  - override /masking: random
  - override /loss: masked_mse
  - _self_

name: toy_mim
masking:
  ratio: 0.5
  unit_size: 8
data:
  img_size: 32
  batch_size: 8
optim:
  blr: 0.05
  warmup_epochs: 0
"""


def write_configs(root: Path) -> Path:
    """The new files a method and a backbone bring: their configs (the code is tests/toy_parts.py)."""
    for relative, text in {
        "model/backbone/toy_conv.yaml": BACKBONE,
        "model/decoder/toy_pixels.yaml": DECODER,
        "experiment/toy_mim.yaml": METHOD,
    }.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def toy_overrides(conf: Path, synthetic_root: Path) -> list[str]:
    return [
        f"hydra.searchpath=[file://{conf}]",
        "experiment=toy_mim",
        f"data.root={synthetic_root}",
        "hardware.num_workers=0",
        "logger=csv",
        "trainer.max_epochs=4",
        "trainer.log_every_n_steps=1",
        "~callbacks.progress",
    ]


def test_a_new_backbone_and_method_train_from_new_files_only(synthetic_root, tmp_path):
    conf = write_configs(tmp_path / "conf")
    result = run(compose_config(toy_overrides(conf, synthetic_root), tmp_path / "run"))
    rows = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [
        float(r.split(",")[header.index("train/loss_step")])
        for r in rows[1:]
        if r.split(",")[header.index("train/loss_step")]
    ]
    assert len(losses) >= 18 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns (norm-pix MSE on the masked units)
    assert Path(result["last_checkpoint"]).is_file()

    probe = run(
        compose_config(
            [
                *toy_overrides(conf, synthetic_root)[:1],
                "experiment=linprobe_vit_tiny_synthetic",
                "model/backbone=toy_conv",
                f"task.pretrained={result['last_checkpoint']}",
                f"data.root={synthetic_root}",
                "data.img_size=32",
                "data.batch_size=8",
                "hardware.num_workers=0",
                "logger=csv",
                "trainer.max_epochs=1",
                "~callbacks.progress",
            ],
            tmp_path / "probe",
        )
    )
    assert "val/acc1" in probe["metrics"]  # the toy encoder, loaded from its pre-training checkpoint, probed


def test_a_backbone_missing_part_of_the_contract_is_named_when_the_task_is_built(synthetic_root, tmp_path):
    conf = write_configs(tmp_path / "conf")
    (conf / "model/backbone/toy_conv.yaml").write_text(BACKBONE + "global_pool: cls\n")
    with pytest.raises((BackboneContractError, ValueError), match="cls"):
        run(compose_config(toy_overrides(conf, synthetic_root), tmp_path / "run"))
