"""Checkpoints are written when asked, hold the final state, survive Ctrl-C, and bad files give clear messages."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from mimlab.checkpoints.atomic import AtomicCheckpointIO, CheckpointWriteError
from mimlab.train import build

TINY = ["experiment=mae_vit_tiny_synthetic", "data.img_size=32", "hardware.num_workers=0", "logger=csv",
        "model.backbone.embed_dim=32", "model.backbone.depth=1", "model.backbone.num_heads=2",
        "model.decoder.embed_dim=16", "model.decoder.num_heads=2", "~callbacks.progress", "~callbacks.reconstruction",
        "~callbacks.knn", "~callbacks.dashboard", "~callbacks.throughput"]


def test_every_n_train_steps_writes_last_at_each_nth_step_and_at_the_end(tmp_path, synthetic_root, monkeypatch):
    """60 train images, batch 5: 12 steps per epoch x 2 epochs; every 5 steps -> last.ckpt at 5, 10, 15, 20 and 24."""
    writes: list[tuple[str, int]] = []
    save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        writes.append((Path(path).name, checkpoint["global_step"]))
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    cfg = compose_config([*TINY, f"data.root={synthetic_root}", "data.batch_size=5", "trainer.max_epochs=2",
                          "callbacks.checkpoint.every_n_train_steps=5"], tmp_path)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 24
    assert [step for name, step in writes if name == "last.ckpt"] == [5, 10, 12, 15, 20, 24]
    assert sorted({step for name, step in writes if name.startswith("best")}) == [12, 24]  # best val/loss per epoch
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 24


def train_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m mimlab.train`` in its own session (a terminal's process group: DataLoader workers get signals too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "mimlab.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, start_new_session=True)


@pytest.mark.slow
def test_ctrl_c_mid_epoch_saves_last_ckpt_and_prints_the_resume_hint(tmp_path, synthetic_root):
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("hardware.num_workers")]
    proc = train_cli([*args, "hardware.num_workers=2", f"data.root={synthetic_root}", "data.batch_size=8",
                      "trainer.max_epochs=2", f"hydra.run.dir={run_dir}",
                      "+callbacks.kill._target_=mimlab.callbacks.fault_injection.KillAtStep", "+callbacks.kill.step=3",
                      "+callbacks.kill.signal_name=SIGINT", "+callbacks.kill.process_group=true"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3  # mid-epoch 0 (7 steps)
    assert f"Ctrl-C received: saved {last} at step 3; resume with ckpt_path={last}" in output
