"""A real (tiny) pre-training run through the CLI composition: the loss falls and every artefact is written."""

import csv
import subprocess
import sys

import pytest
import torch

from conftest import SMALL_VIT, TINY_MAE_DECODER, compose_config
from mimlab.train import build, run

TINY = [
    "experiment=mae_vit_tiny_synthetic",
    "data.img_size=32",
    "data.batch_size=8",
    "hardware.num_workers=0",
    *SMALL_VIT,
    *TINY_MAE_DECODER,
    "optim.warmup_epochs=1",
    "optim.blr=5e-3",
    "logger=csv",
    "~callbacks.progress",
    "callbacks.reconstruction.every_n_steps=10",
    "trainer.log_every_n_steps=2",
]


@pytest.mark.slow
def test_tiny_pretraining_lowers_the_loss_and_writes_artefacts(tmp_path, synthetic_root):
    overrides = [*TINY, f"data.root={synthetic_root}", "trainer.max_epochs=12"]
    cfg = compose_config(overrides, tmp_path)
    datamodule, module, trainer = build(compose_config(overrides, tmp_path / "untrained"))  # a run folder of its own
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    result = run(cfg)
    after = result["metrics"]["val/loss"]
    assert after < 0.9 * before, (before, after)

    ckpt = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["mimlab"]["config"]["name"] == "mae_vit_tiny_synthetic"
    assert ckpt["mimlab"]["config"]["masking"]["ratio"] == 0.75
    assert any(k.startswith("backbone.blocks.") for k in ckpt["state_dict"])
    assert result["best_checkpoint"] and (tmp_path / "checkpoints").is_dir()
    panels = sorted((tmp_path / "reconstructions").glob("step_*.png"))
    assert len(panels) >= 2 and panels[-1].stat().st_size > 1000
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"train/loss_step", "lr/pg1", "lr/pg2", "val/loss"} <= columns
    assert {"perf/img_per_s", "perf/img_per_s_window"} <= columns
    lrs = [float(r["lr/pg1"]) for r in rows if r.get("lr/pg1")]
    assert lrs[0] < max(lrs)  # warm-up


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(tmp_path, synthetic_root):
    base = [*TINY, f"data.root={synthetic_root}"]
    first = run(compose_config([*base, "trainer.max_epochs=1"], tmp_path / "a"))
    extended = ["trainer.max_epochs=2", "allow_schedule_change=true"]  # the run is extended: its schedule changes
    resumed = compose_config([*base, *extended, f"ckpt_path={first['last_checkpoint']}"], tmp_path / "b")
    datamodule, module, trainer = build(resumed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resumed.ckpt_path)
    steps_per_epoch = 60 // 8
    assert trainer.global_step == 2 * steps_per_epoch


def test_cli_rejects_a_misspelled_key_before_touching_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mimlab.train", "masking.ratoi=0.5", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "masking.ratoi" in proc.stderr and "masking.ratio" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow  # a new interpreter (~8 s); the fast tier keeps one CLI subprocess test
def test_cli_suggests_the_closest_key():
    proc = subprocess.run(
        [sys.executable, "-m", "mimlab.train", "experiment=mae_vit_tiny_synthetic", "model.decoder.dept=2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown config key 'model.decoder.dept'. Did you mean 'model.decoder.depth'" in proc.stderr
