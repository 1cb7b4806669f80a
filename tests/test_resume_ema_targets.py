"""Exact resume of the EMA-teacher methods: a data2vec 2.0 / I-JEPA run killed mid-epoch (SIGKILL) and resumed from
``last.ckpt`` ends with the same student, EMA teacher and optimiser state as an uninterrupted run. State that must come
back: the teacher weights and its ``synced`` flag, the momentum schedule position, the global RNG (data2vec 2.0's
decoder noise), the cosine weight decay (I-JEPA) and the per-step masks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_EMA_TARGETS, TINY_VIT

pytestmark = pytest.mark.slow


def train(experiment: str, root: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        f"experiment={experiment}",
        f"data.root={root}",
        "data.batch_size=8",
        "hardware.num_workers=0",
        *TINY_VIT,
        "optim.warmup_epochs=1",
        "trainer.max_epochs=2",
        "logger=csv",
        "~callbacks.progress",
        "~callbacks.reconstruction",
        "~callbacks.knn",
        "~callbacks.target_maps",
        "callbacks.checkpoint.monitor=null",
        "callbacks.checkpoint.save_top_k=0",
        "callbacks.checkpoint.every_n_train_steps=3",
        f"hydra.run.dir={run_dir}",
        *TINY_EMA_TARGETS[experiment],
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "mimlab.train", *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.mark.parametrize("experiment", sorted(TINY_EMA_TARGETS))
def test_sigkill_then_resume_equals_uninterrupted_run(experiment, tmp_path, synthetic_root):
    full = train(experiment, synthetic_root, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = train(
        experiment,
        synthetic_root,
        tmp_path / "crash",
        "+callbacks.kill._target_=mimlab.callbacks.fault_injection.KillAtStep",
        "+callbacks.kill.step=9",
    )
    assert crashed.returncode == -signal.SIGKILL
    last = tmp_path / "crash" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6  # mid-epoch (7 steps/epoch)
    resumed = train(experiment, synthetic_root, tmp_path / "resumed", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for run in ("full", "resumed")
    )
    assert any(k.startswith("target.teacher.") for k in a["state_dict"])
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different
    groups_a, groups_b = (ckpt["optimizer_states"][0]["param_groups"] for ckpt in (a, b))
    assert [g["weight_decay"] for g in groups_a] == [g["weight_decay"] for g in groups_b]
