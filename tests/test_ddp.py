"""A real 2-process Lightning DDP fit on CPU (gloo) of the tiny MAE, launched like a user would (``python -m mimlab.train``).

Checks: both ranks hold identical weights after an optimiser step (gradients were all-reduced: the ranks saw different
samples, so without the all-reduce they would differ), only rank 0 writes checkpoints and logs, and the lr is scaled by
the effective batch per-device batch x devices x accumulation (OptimizerFactory, seen through the real Trainer).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
BATCH, DEVICES, ACCUM, BLR = 4, 2, 2, 1e-3


@pytest.fixture(scope="module")
def ddp_run(synthetic_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp_run")
    probe_dir = run_dir / "probe"
    overrides = [
        "experiment=mae_vit_tiny_synthetic", "hardware=ddp", "hardware.accelerator=cpu", f"hardware.devices={DEVICES}",
        "hardware.precision=32-true", "hardware.compile=false", "hardware.fused_optimizer=false",
        "hardware.matmul_precision=highest", "hardware.num_workers=0", "hardware.pin_memory=false",
        "+hardware.strategy.process_group_backend=gloo", "logger=csv", f"data.root={synthetic_root}",
        f"data.batch_size={BATCH}", "data.img_size=32", "model.backbone.depth=1", "model.backbone.embed_dim=32",
        "model.backbone.num_heads=2", "model.decoder.embed_dim=32", "model.decoder.num_heads=2",
        f"optim.blr={BLR}", "optim.warmup_epochs=0", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
        f"trainer.accumulate_grad_batches={ACCUM}", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
        "~callbacks.progress", "~callbacks.reconstruction", "~callbacks.throughput",
        "+callbacks.probe._target_=tests.ddp_probe.DDPProbe", f"+callbacks.probe.out_dir={probe_dir}",
        f"hydra.run.dir={run_dir / 'out'}",
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    proc = subprocess.run([sys.executable, "-m", "mimlab.train", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    (run_dir / "out").mkdir(exist_ok=True)
    (run_dir / "out" / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=False) for r in range(DEVICES)]
    return run_dir / "out", ranks


def test_both_ranks_ran_as_one_ddp_job(ddp_run):
    _, ranks = ddp_run
    assert [r["world_size"] for r in ranks] == [DEVICES, DEVICES]
    assert [r["is_global_zero"] for r in ranks] == [True, False]


def test_ranks_agree_on_weights_after_a_step(ddp_run):
    _, (rank0, rank1) = ddp_run
    before, after0, after1 = rank0["before"], rank0["after_step_1"], rank1["after_step_1"]
    for name in before:
        torch.testing.assert_close(rank1["before"][name], before[name], rtol=0, atol=0, msg=f"init differs: {name}")
    changed = [n for n in before if not torch.equal(before[n], after0[n])]
    assert len(changed) > len(before) // 2, "the optimiser step changed almost nothing"
    for name in before:
        torch.testing.assert_close(after1[name], after0[name], rtol=1e-6, atol=1e-7, msg=f"ranks disagree: {name}")


def test_only_rank_zero_writes_checkpoints_and_logs(ddp_run):
    out, (rank0, rank1) = ddp_run
    assert rank0["checkpoint_writes"] >= 1 and rank1["checkpoint_writes"] == 0
    assert rank0["log_writes"] >= 1 and rank1["log_writes"] == 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and len(ckpts) == 2, ckpts  # last + best only, nothing per rank
    with open(out / "csv" / "metrics.csv") as handle:
        assert any(row.get("train/loss_step") for row in csv.DictReader(handle))


def test_static_graph_is_dropped_only_under_accumulation(ddp_run):
    out, _ = ddp_run
    assert (out / "stderr.txt").read_text().count("static_graph=true is switched off") == 1  # rank-zero warning


def test_lr_is_scaled_by_devices_times_accumulation(ddp_run):
    _, ranks = ddp_run
    expected = BLR * BATCH * DEVICES * ACCUM / 256
    assert [r["base_lr"] for r in ranks] == pytest.approx([expected, expected])
