"""Real 2-process Lightning DDP fits on CPU (gloo) for every task type, launched like a user would
(``python -m mimlab.train ... hardware=ddp``), and 2-process evaluation against 1-process evaluation.

For each of MAE, FCMAE, iTPN, Img2Vec pre-training, fine-tuning, linear probing, detection and segmentation:
the ranks' training sample indices are disjoint and together make the epoch, and the ranks hold identical weights
after the optimiser steps (they saw different samples, so without the all-reduce they would differ).
MAE: 2 processes x batch B end within float tolerance of 1 process x batch 2B (same samples, same masks), with the
same val/loss (validation masks keyed by sample, not by batch or rank).
Evaluation: the metrics a 2-process fit logs for its final weights (top-1/top-5, kNN, online probe, box/mask mAP,
mIoU) equal exactly those ``mimlab-eval`` gives for the checkpoint it wrote, and ``mimlab-eval`` with 2 processes
equals it with 1.
MAE also checks that only rank 0 writes checkpoints and logs; FCMAE (with gradient accumulation) that the lr is
scaled by per-device batch x devices x accumulation and that DDP's static graph is dropped under accumulation.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import DDP_CPU_TWO_PROCESSES, TINY_MAE_DECODER, TINY_VIT
from mimlab.data.resumable import ResumableSampler
from mimlab.data.synthetic_dense import write_ade20k, write_coco

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
BATCH, BLR, SEED = 4, 1e-3, 0
DDP = DDP_CPU_TWO_PROCESSES
COMMON = [
    f"seed={SEED}",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "+trainer.num_sanity_val_steps=0",
    "~callbacks.progress",
    f"data.batch_size={BATCH}",
]
PRETRAIN = [
    "data.img_size=32",
    f"optim.blr={BLR}",
    "optim.warmup_epochs=0",
    "~callbacks.reconstruction",
    "~callbacks.throughput",
]
DENSE = [*TINY_VIT, "model.neck.out_channels=16", "data.generate_if_missing=false", "optim.schedule.warmup_steps=2"]
TASKS = {
    "mae": [
        "experiment=mae_vit_tiny_synthetic",
        *PRETRAIN,
        *TINY_VIT,
        *TINY_MAE_DECODER,
        "model.backbone.drop_path_rate=0",
        "callbacks=pretrain_with_probes",
        "callbacks.knn.batch_size=16",
    ],
    "fcmae": [
        "experiment=fcmae_convnextv2_atto_synthetic",
        *PRETRAIN,
        "data.img_size=64",
        "model.decoder.embed_dim=32",
        "trainer.accumulate_grad_batches=2",
        "~callbacks.knn",
    ],
    "itpn": ["experiment=itpn_hivit_tiny_synthetic", *PRETRAIN, "model.decoder.embed_dim=32", "~callbacks.knn"],
    "img2vec": [
        "experiment=img2vec_vit_tiny_synthetic",
        *PRETRAIN,
        "data.img_size=64",
        *TINY_VIT,
        "model.decoder.decoder_dim=32",
        "model.decoder.proj_hidden_dim=32",
        "~callbacks.knn",
    ],
    "finetune": [
        "experiment=finetune_vit_tiny_synthetic",
        "data.img_size=32",
        *TINY_VIT,
        "optim.warmup_epochs=0",
        "~callbacks.throughput",
    ],
    "linprobe": [
        "experiment=linprobe_vit_tiny_synthetic",
        "data.img_size=32",
        *TINY_VIT,
        "optim.warmup_epochs=0",
        "~callbacks.throughput",
    ],
    "detect": [
        "experiment=detect_mae_vit_tiny_synthetic",
        *DENSE,
        "task.head_channels=16",
        "task.representation_size=32",
        "task.box_batch_size_per_image=32",
        "task.rpn_pre_nms_top_n=200",
        "task.rpn_post_nms_top_n=100",
        "trainer.check_val_every_n_epoch=1",
    ],  # enough proposals for mAP > 0
    "segment": [
        "experiment=segment_mae_vit_tiny_synthetic",
        *DENSE,
        "task.decode_head.channels=16",
        "task.aux_head.channels=8",
        "trainer.check_val_every_n_epoch=1",
    ],
}
EXACT = {  # metrics a 2-process evaluation must reproduce exactly
    "mae": ["knn/acc1", "probe/val_acc1"],
    "finetune": ["val/acc1", "val/acc5"],
    "linprobe": ["val/acc1", "val/acc5"],
    "detect": [
        "val/bbox_mAP",
        "val/bbox_mAP_50",
        "val/segm_mAP",
        "val/segm_mAP_50",
        "val/bbox_mAR_100",
        "val/segm_mAR_100",
    ],
    "segment": ["val/mIoU", "val/aAcc"],
}
WALL: dict[str, float] = {}


@pytest.fixture(scope="module")
def roots(synthetic_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp_data")
    write_coco(base / "coco", num_train=24, num_val=6)
    write_ade20k(base / "ade", num_train=24, num_val=6)
    return {"image": synthetic_root, "detect": base / "coco", "segment": base / "ade"}


def run(args: list[str], log_dir: Path, label: str) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository, keep its stderr in ``log_dir`` and print its wall time."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "MASTER_PORT": str(29500 + (os.getpid() + len(WALL)) % 1000),
    }
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    WALL[label] = time.perf_counter() - start
    print(f"{label}: {WALL[label]:.1f} s")
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def fits(roots, tmp_path_factory):
    """task -> (run folder, [rank0 record, rank1 record], overrides), made on first use by a 2-process fit."""
    made: dict[str, tuple] = {}

    def get(task: str):
        if task not in made:
            out = tmp_path_factory.mktemp(f"ddp_{task}")
            root = roots.get(task, roots["image"])
            overrides = [*TASKS[task], *COMMON, f"data.root={root}"]
            run(
                [
                    "-m",
                    "mimlab.train",
                    *overrides,
                    *DDP,
                    "+callbacks.probe._target_=tests.ddp_probe.DDPProbe",
                    f"+callbacks.probe.out_dir={out / 'probe'}",
                    f"hydra.run.dir={out / 'run'}",
                ],
                out / "run",
                f"2-process fit {task}",
            )
            ranks = [torch.load(out / "probe" / f"rank{r}.pt", weights_only=False) for r in range(2)]
            made[task] = (out / "run", ranks, overrides)
        return made[task]

    return get


def last_logged(run_dir: Path, keys: list[str]) -> dict[str, float]:
    """The last logged value of each key in the run's csv/metrics.csv."""
    values: dict[str, float] = {}
    with open(run_dir / "csv" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            values.update({k: float(row[k]) for k in keys if row.get(k)})
    return values


@pytest.mark.parametrize("task", list(TASKS))
def test_ranks_read_disjoint_halves_of_the_epoch_and_end_with_identical_weights(task, fits):
    _, (rank0, rank1), _ = fits(task)
    assert [r["world_size"] for r in (rank0, rank1)] == [2, 2]
    a, b = rank0["indices"], rank1["indices"]
    epoch_size = {"detect": 24, "segment": 24}.get(task, 60)
    steps = epoch_size // (2 * BATCH)  # full global batches of 2 x BATCH (the last incomplete one is dropped)
    assert rank0["train_batches"] == rank1["train_batches"] == steps
    assert len(a) == len(b) == steps * BATCH and not set(a) & set(b)
    epoch = ResumableSampler(epoch_size, seed=SEED).epoch_order()  # the epoch's permutation (seed 0, epoch 0)
    assert sorted(a + b) == sorted(epoch[: steps * 2 * BATCH])
    assert rank0["steps"] >= 3
    before, final0, final1 = rank0["before"], rank0["final"], rank1["final"]
    for name in before:
        assert torch.equal(rank1["before"][name], before[name]), f"init differs: {name}"
    trained = [n for n in before if not torch.equal(before[n], final0[n])]
    assert len(trained) > len(before) // 2, "training changed almost nothing"
    for name in before:
        torch.testing.assert_close(final1[name], final0[name], rtol=1e-6, atol=1e-7, msg=f"ranks disagree: {name}")


def evaluate(ckpt: Path, out: Path, label: str, extra: list[str] = ()) -> dict[str, float]:
    """``python -m mimlab.eval ckpt=<ckpt>`` (the checkpoint validated as its task) -> its metrics.json metrics."""
    run(["-m", "mimlab.eval", f"ckpt={ckpt}", f"out={out}", "~callbacks.probe", *extra], out, label)
    return json.loads((out / "metrics.json").read_text())["metrics"]


@pytest.mark.parametrize("task", list(EXACT))
def test_two_process_evaluation_equals_one_process_evaluation(task, fits, tmp_path):
    run_dir, _, _ = fits(task)
    two = last_logged(run_dir, EXACT[task])
    one = evaluate(run_dir / "checkpoints" / "last.ckpt", tmp_path / "eval", f"1-process mimlab-eval {task}")
    print(f"{task}: 2 processes {two} | 1 process { {k: one[k] for k in EXACT[task]} }")
    assert set(two) == set(EXACT[task])
    assert any(v != 0 for v in two.values()), "all metrics are 0: the comparison would prove nothing"
    assert {k: one[k] for k in EXACT[task]} == two


@pytest.mark.parametrize("task", ["linprobe", "detect"])
def test_mimlab_eval_with_two_processes_equals_one_process(task, fits, tmp_path):
    run_dir, _, _ = fits(task)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    one = evaluate(ckpt, tmp_path / "one", f"1-process mimlab-eval {task}")
    two = evaluate(ckpt, tmp_path / "two", f"2-process mimlab-eval {task}", DDP)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2
    assert any(one[k] != 0 for k in EXACT[task]), "all metrics are 0: the comparison would prove nothing"
    assert {k: two[k] for k in EXACT[task]} == {k: one[k] for k in EXACT[task]}


def test_mae_two_processes_of_batch_b_equal_one_process_of_batch_2b(fits, synthetic_root, tmp_path):
    """Same samples, same masks (drawn in the loader workers per sample), so the same weights and the same
    ``val/loss``: validation masks depend on (seed, sample index) only, not on the batch or the rank."""
    two_dir, (rank0, rank1), overrides = fits("mae")
    single = tmp_path / "single"
    run(
        [
            "-m",
            "mimlab.train",
            *overrides,
            f"data.batch_size={2 * BATCH}",
            "hardware.num_workers=0",
            "+callbacks.probe._target_=tests.ddp_probe.DDPProbe",
            f"+callbacks.probe.out_dir={single / 'probe'}",
            f"hydra.run.dir={single / 'run'}",
        ],
        single / "run",
        f"1-process fit mae batch {2 * BATCH}",
    )
    one = torch.load(single / "probe" / "rank0.pt", weights_only=False)
    assert sorted(one["indices"]) == sorted(rank0["indices"] + rank1["indices"])  # the same samples
    assert one["steps"] == rank0["steps"] == 60 // (2 * BATCH)
    assert one["base_lr"] == pytest.approx(rank0["base_lr"])  # same effective batch, same lr
    worst = max((one["final"][n] - rank0["final"][n]).abs().max().item() for n in one["final"])
    moved = min((one["final"][n] - one["before"][n]).abs().max().item() for n in one["final"])
    print(
        f"MAE 2 x batch {BATCH} vs 1 x batch {2 * BATCH}: max |weight difference| {worst:.2e} after "
        f"{one['steps']} steps (smallest per-tensor max change from init {moved:.2e})"
    )
    for name in one["final"]:
        torch.testing.assert_close(rank0["final"][name], one["final"][name], rtol=1e-4, atol=1e-6, msg=name)
    val_two, val_one = last_logged(two_dir, ["val/loss"]), last_logged(single / "run", ["val/loss"])
    print(f"val/loss: 2 x batch {BATCH} {val_two['val/loss']:.6f}, 1 x batch {2 * BATCH} {val_one['val/loss']:.6f}")
    assert val_two["val/loss"] == pytest.approx(val_one["val/loss"], rel=1e-5)


def test_only_rank_zero_writes_checkpoints_and_logs(fits):
    run_dir, (rank0, rank1), _ = fits("mae")
    assert [r["is_global_zero"] for r in (rank0, rank1)] == [True, False]
    assert rank0["checkpoint_writes"] >= 1 and rank1["checkpoint_writes"] == 0
    assert rank0["log_writes"] >= 1 and rank1["log_writes"] == 0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and len(ckpts) == 2, ckpts  # last + best only, nothing per rank
    with open(run_dir / "csv" / "metrics.csv") as handle:
        assert any(row.get("train/loss_step") for row in csv.DictReader(handle))


def test_ddp_wrapper_is_built_with_the_hardware_settings(fits):
    _, ranks, _ = fits("mae")
    expected = {"static_graph": True, "gradient_as_bucket_view": True, "find_unused_parameters": False}
    assert [r["ddp"] for r in ranks] == [expected, expected]


def test_accumulation_scales_the_lr_and_drops_the_static_graph(fits):
    run_dir, ranks, _ = fits("fcmae")
    expected = BLR * BATCH * 2 * 2 / 256  # per-device batch x devices x accumulation
    assert [r["base_lr"] for r in ranks] == pytest.approx([expected, expected])
    assert [r["ddp"]["static_graph"] for r in ranks] == [False, False]
    assert (run_dir / "stderr.txt").read_text().count("static_graph=true is switched off") == 1  # rank-zero warning


@pytest.mark.parametrize("task", ["finetune", "detect", "segment"])
def test_validation_metrics_are_logged_without_sync_dist_warnings(task, fits):
    """The metrics are computed from every rank's states (the same on each rank): logged as synchronised."""
    run_dir, _, _ = fits(task)
    stderr = (run_dir / "stderr.txt").read_text()
    assert "'val/" not in "".join(line for line in stderr.splitlines() if "sync_dist=True" in line)


def test_a_killed_peer_is_named_with_the_checkpoint_to_resume_from(synthetic_root, tmp_path):
    """Rank 1 is SIGKILLed at step 3: rank 0 says a peer process stopped and which checkpoint to resume from."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", MASTER_PORT=str(29500 + (os.getpid() + 7) % 1000))
    args = [*TASKS["mae"], *COMMON, *DDP, f"data.root={synthetic_root}", f"hydra.run.dir={run_dir}"]
    args += [
        "trainer.max_epochs=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        "+callbacks.kill._target_=mimlab.callbacks.fault_injection.KillAtStep",
        "+callbacks.kill.step=3",
        "+callbacks.kill.rank=1",
    ]
    command = [sys.executable, "-m", "mimlab.train", *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert (
        "PeerProcessLostError: another process of this 2-process run stopped (killed, out of memory or crashed), so "
        "rank 0 lost its connection at step 3" in proc.stderr
    ), proc.stderr[-3000:]
    assert f"then resume with ckpt_path={last}." in proc.stderr and last.is_file()
    assert json.loads((run_dir / ".mimlab-run.json").read_text())["status"] == "failed"
