"""Exact resume after a crash (SIGKILL mid-epoch) and a resumable checkpoint after preemption (SIGTERM)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from mimlab.checkpoints.compat import ConfigMismatchError, check_resume_config

STEPS_PER_EPOCH = 60 // 8  # synthetic_root: 60 train images, batch 8


def tiny_args(root: Path, run_dir: Path) -> list[str]:
    return [
        "experiment=mae_vit_tiny_synthetic", f"data.root={root}", "data.img_size=32", "data.batch_size=8",
        "hardware.num_workers=0", "model.backbone.embed_dim=32", "model.backbone.depth=2", "model.backbone.num_heads=2",
        "model.decoder.embed_dim=16", "model.decoder.num_heads=2", "model.backbone.drop_path_rate=0.1",
        "optim.warmup_epochs=1", "trainer.max_epochs=2", "logger=csv", "~callbacks.progress", "~callbacks.reconstruction",
        "callbacks.checkpoint.monitor=null", "callbacks.checkpoint.save_top_k=0", "callbacks.checkpoint.every_n_train_steps=3",
        f"hydra.run.dir={run_dir}",
    ]


def train(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mimlab.train", *args], capture_output=True, text=True, timeout=300, env=env)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, synthetic_root):
    full = train(tiny_args(synthetic_root, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]

    crash_dir = tmp_path / "crash"
    crashed = train([*tiny_args(synthetic_root, crash_dir),
                     "+callbacks.kill._target_=mimlab.callbacks.fault_injection.KillAtStep", "+callbacks.kill.step=9"])
    assert crashed.returncode == -signal.SIGKILL
    last = crash_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["global_step"] % STEPS_PER_EPOCH != 0  # mid-epoch
    assert not list((crash_dir / "checkpoints").glob(".*tmp*"))  # no partial files left behind

    resumed = train([*tiny_args(synthetic_root, tmp_path / "resumed"), f"ckpt_path={last}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "full" / "checkpoints" / "last.ckpt"), weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.mark.slow
def test_sigterm_leaves_a_resumable_checkpoint(tmp_path, synthetic_root):
    run_dir = tmp_path / "preempted"
    proc = train([*tiny_args(synthetic_root, run_dir),
                  "+callbacks.kill._target_=mimlab.callbacks.fault_injection.KillAtStep", "+callbacks.kill.step=4",
                  "+callbacks.kill.signal_name=SIGTERM"])
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and "rng_states" in ckpt and ckpt["mimlab"]["data"]
    assert "SIGTERM received" in proc.stdout + proc.stderr


def test_resume_with_a_different_model_config_lists_the_keys(tmp_path):
    cfg = compose_config(["experiment=mae_vit_tiny_synthetic"], tmp_path)
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(cfg, resolve=True)
    path = tmp_path / "x.ckpt"
    torch.save({"mimlab": {"config": saved}}, path)
    changed = OmegaConf.to_container(compose_config(["experiment=mae_vit_tiny_synthetic", "masking.ratio=0.6",
                                                     "model.decoder.depth=2"], tmp_path), resolve=True)
    with pytest.raises(ConfigMismatchError, match=r"(?s)masking\.ratio: 0\.75 -> 0\.6.*allow_config_change=true") as err:
        check_resume_config(path, changed)
    assert "model.decoder.depth: 1 -> 2" in str(err.value)
    assert len(check_resume_config(path, changed, allow_change=True)) == 2
    assert check_resume_config(path, saved) == []
