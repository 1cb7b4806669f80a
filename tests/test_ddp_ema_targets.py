"""Real 2-process Lightning DDP fits on CPU (gloo) of data2vec 2.0 (multi-mask + EMA teacher) and I-JEPA (context /
target blocks + EMA teacher), launched like a user would (``python -m mimlab.train``).

The ranks see different images and draw different masks, so their gradients differ; after an optimiser step both the
student and the EMA teacher must still be identical on both ranks (gradients all-reduced, the teacher updated from the
same student), and the teacher must have moved with the student.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DDP_CPU_TWO_PROCESSES, TINY_EMA_TARGETS, TINY_VIT

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("experiment", sorted(TINY_EMA_TARGETS))
def test_two_ranks_keep_student_and_teacher_identical(experiment, synthetic_root, tmp_path):
    probe_dir = tmp_path / "probe"
    overrides = [
        f"experiment={experiment}",
        *DDP_CPU_TWO_PROCESSES,
        "logger=csv",
        f"data.root={synthetic_root}",
        "data.batch_size=4",
        *TINY_VIT,
        "optim.warmup_epochs=0",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "~callbacks.progress",
        "~callbacks.reconstruction",
        "~callbacks.throughput",
        "~callbacks.knn",
        "~callbacks.target_maps",
        "+callbacks.probe._target_=tests.ddp_probe.DDPProbe",
        f"+callbacks.probe.out_dir={probe_dir}",
        f"hydra.run.dir={tmp_path / 'out'}",
        *TINY_EMA_TARGETS[experiment],
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "MASTER_PORT": str(29600 + os.getpid() % 1000),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mimlab.train", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rank0, rank1 = (torch.load(probe_dir / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert [rank0["world_size"], rank1["world_size"]] == [2, 2]
    after0 = {**rank0["after_step_1"], **rank0["teacher_after_step_1"]}
    after1 = {**rank1["after_step_1"], **rank1["teacher_after_step_1"]}
    teacher = list(rank0["teacher_after_step_1"])
    assert len(teacher) > 5
    for name in after0:
        torch.testing.assert_close(after1[name], after0[name], rtol=1e-6, atol=1e-7, msg=f"ranks disagree: {name}")
    moved = [n for n in teacher if not torch.equal(after0[n], rank0["teacher_before"][n])]
    assert len(moved) > len(teacher) // 2, "the EMA teacher did not follow the student"
