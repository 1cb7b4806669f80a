"""experiments/compare_released: released files (random weights, released layouts) under one protocol: each is
rebuilt for the fine-tuning recipe from the config the representation check inferred, and the table lists them."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from mimlab.checkpoints import released
from mimlab.checkpoints.encoder import checkpoint_encoder

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "compare_released", ROOT / "experiments" / "compare_released" / "compare.py"
)
compare = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
spec.loader.exec_module(compare)  # type: ignore[union-attr]


@pytest.mark.parametrize("name", sorted(released.TINY))
def test_the_fine_tuning_recipe_rebuilds_each_released_encoder_and_loads_it(tmp_path, name):
    path = tmp_path / name
    torch.save(released.TINY[name](), path)
    encoder = checkpoint_encoder(path)
    cfg = compose_config(
        [
            "experiment=finetune_vit_tiny_synthetic",
            *compare.backbone_overrides(encoder.node),
            f"task.pretrained={path}",
            f"data.img_size={encoder.node['img_size']}",
            "task.num_classes=2",
        ],
        tmp_path,
    )
    task = instantiate(cfg.task)
    assert type(task.backbone) is type(encoder.backbone)
    for key, value in task.backbone.state_dict().items():
        if not key.startswith("norm."):  # fine-tuning drops a ViT's final norm for its head's fc_norm
            assert torch.equal(value, encoder.backbone.state_dict()[key]), key


def test_the_protocol_writes_one_row_per_checkpoint(tmp_path, synthetic_root):
    files = tmp_path / "files"
    files.mkdir()
    torch.save(released.ijepa_vit(), files / "ijepa.pth.tar")
    torch.save(released.simmim_vit(), files / "simmim.pth")
    compare.main(
        [f"{files}/ijepa.pth.tar::encoder", f"SimMIM={files}/simmim.pth"]
        + ["--data", str(synthetic_root), "--out", str(tmp_path / "out"), "--probe-epochs", "2"]
    )
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["checkpoint"] for r in rows] == ["ijepa.pth.tar::encoder", "SimMIM"]
    assert [r["layout"] for r in rows] == ["official I-JEPA, encoder", "official SimMIM ViT (BEiT layout)"]
    assert all(0 <= float(r["kNN"]) <= 100 and r["kNN random"] for r in rows)
    assert (
        "| SimMIM | official SimMIM ViT (BEiT layout) | MaskTokenViT | avg | 64 |"
        in (tmp_path / "out" / "results.md").read_text()
    )
