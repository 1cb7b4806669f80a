"""hardware=slurm on a real one-node SLURM cluster (``scripts/slurm_local.sh start``; ``.ci/run`` starts one).

Three jobs are submitted at once through Hydra's submitit launcher, exactly as a user would
(``python -m mimlab.train -m experiment=mae_vit_tiny_synthetic hardware=slurm ...``), tiny and on CPU:
  reference  1 task, runs to the end;
  requeued   the same run; the test requeues it (``scontrol requeue``) while it is held at step HOLD_STEP, SLURM
             SIGTERMs the job and starts it again, and it must resume from its checkpoint and end bit-identical
             to the reference;
  two_tasks  2 tasks on the one node (gloo): Lightning's SLURMEnvironment maps ranks from the SLURM variables.
Without a cluster the tests are skipped, unless MIMLAB_REQUIRE_SLURM=1 (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import TINY_MAE_DECODER, TINY_VIT
from mimlab.train import CONFIG_DIR
from mimlab.utils.slurm import SlurmPreflight

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS, HOLD_STEP = (
    6,
    2,
    8,
)  # HOLD_STEP: mid-epoch 1 (batch 2 of the second epoch), worker processes on
TINY = [
    "experiment=mae_vit_tiny_synthetic",
    "hardware=slurm",
    "hardware.accelerator=cpu",
    "hardware.precision=32-true",
    "hardware.compile=false",
    "hardware.fused_optimizer=false",
    "hardware.matmul_precision=highest",
    "hardware.pin_memory=false",
    "hardware.num_workers=1",
    "hardware.checkpoint_every_n_steps=2",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.timeout_min=10",
    "logger=csv",
    "data.batch_size=4",
    "data.img_size=32",
    *TINY_VIT,
    *TINY_MAE_DECODER,
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "trainer.limit_val_batches=1",
    "~callbacks.progress",
    "~callbacks.reconstruction",
    "~callbacks.throughput",
    "+callbacks.probe._target_=tests.slurm_probe.SlurmProbe",
]
JOBS = {
    "reference": ["hardware.devices=1"],
    "requeued": ["hardware.devices=1", f"+callbacks.probe.hold_at_step={HOLD_STEP}"],
    "two_tasks": ["hardware.devices=2", "+hardware.strategy.process_group_backend=gloo"],
}


def cluster_answers() -> bool:
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    return ping.returncode == 0 and "UP" in ping.stdout


@pytest.fixture(scope="module")
def cluster():
    if not cluster_answers():
        reason = "no SLURM cluster answers `scontrol ping`: start one with scripts/slurm_local.sh start"
        if os.environ.get("MIMLAB_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    }


def submit(name: str, overrides: list[str], root: Path) -> subprocess.Popen:
    """``python -m mimlab.train -m ...`` into ``root/<name>``; blocks (in the background) until the job is done."""
    out = root / name
    out.mkdir(parents=True)
    args = [
        sys.executable,
        "-m",
        "mimlab.train",
        "-m",
        *overrides,
        f"hydra.sweep.dir={out}",
        f"+callbacks.probe.out_dir={out / 'probe'}",
    ]
    (out / "command.txt").write_text(" ".join(args[1:]))
    log = open(out / "submit.log", "w")  # closed with the process
    return subprocess.Popen(args, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the job ended before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.5)


def probe(run: Path, attempt: int, rank: int) -> dict:
    return torch.load(run / "probe" / f"attempt{attempt}_rank{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def slurm_runs(cluster, synthetic_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    started = time.monotonic()
    procs = {name: submit(name, [*TINY, f"data.root={synthetic_root}", *extra], root) for name, extra in JOBS.items()}
    try:
        wait_for(root / "requeued" / "probe" / "holding", procs["requeued"], timeout=300)
        job_id = probe(root / "requeued", 0, 0)["env"]["SLURM_JOB_ID"]
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        for proc in procs.values():
            proc.wait(timeout=600)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for job in root.glob("*/.submitit/[0-9]*"):
            subprocess.run(["scancel", job.name], capture_output=True, timeout=60)
    print(f"\nSLURM runs: {time.monotonic() - started:.0f} s; requeued job {job_id}")
    return root, {name: proc.returncode for name, proc in procs.items()}


def submit_log(run: Path) -> str:
    return (run / "submit.log").read_text()[-4000:]


def final_checkpoint(run: Path) -> dict:
    return torch.load(run / "0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.slurm
@pytest.mark.slow
def test_submitted_job_runs_and_writes_its_checkpoint(slurm_runs):
    root, returncodes = slurm_runs
    run = root / "reference"
    assert returncodes["reference"] == 0, submit_log(run)
    record = probe(run, 0, 0)
    job_id = record["env"]["SLURM_JOB_ID"]
    assert (run / ".submitit" / job_id / f"{job_id}_submission.sh").read_text().count("#SBATCH --requeue") == 1
    assert record["cluster_environment"] == "SLURMEnvironment" and record["world_size"] == 1
    ckpt = final_checkpoint(run)
    assert ckpt["global_step"] == STEPS_PER_EPOCH * EPOCHS
    assert ckpt["mimlab"]["config"]["hardware"]["num_nodes"] == 1  # the resolved config travels with the weights
    log = (run / "submit.log").read_text()  # the local cluster has no accounting: sacct is named once, not per poll
    assert log.count("sacct") <= 1 and log.count("accounting storage is disabled") <= 1, log[-3000:]


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_job_resumes_and_ends_bit_identical(slurm_runs):
    root, returncodes = slurm_runs
    run, reference = root / "requeued", root / "reference"
    assert returncodes["requeued"] == 0, submit_log(run)  # submitit saw the requeued job finish, not fail
    first, second = probe(run, 0, 0), probe(run, 1, 0)
    assert first["env"]["SLURM_JOB_ID"] == second["env"]["SLURM_JOB_ID"]
    assert (first["env"]["SLURM_RESTART_COUNT"], second["env"]["SLURM_RESTART_COUNT"]) == (None, "1")
    assert (first["start_step"], second["start_step"], second["end_step"]) == (0, HOLD_STEP, STEPS_PER_EPOCH * EPOCHS)
    log = next((run / ".submitit").glob("*/*_0_log.err")).read_text()
    assert f"SIGTERM received: saved {run / '0' / 'checkpoints' / 'last.ckpt'} at step {HOLD_STEP}" in log
    assert sorted(p.name for p in (run / "0" / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    with open(run / "0" / "csv" / "metrics.csv", newline="") as f:  # the requeued job appended to the first's rows
        assert [row["epoch"] for row in csv.DictReader(f) if row.get("val/loss")] == ["0", "1"]

    ours, theirs = final_checkpoint(run), final_checkpoint(reference)
    assert ours["global_step"] == theirs["global_step"] == STEPS_PER_EPOCH * EPOCHS
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    differ = [k for k in theirs["state_dict"] if not torch.equal(ours["state_dict"][k], theirs["state_dict"][k])]
    assert not differ, f"{len(differ)}/{len(theirs['state_dict'])} tensors differ: {differ[:5]}"
    a, b = ours["optimizer_states"][0]["state"], theirs["optimizer_states"][0]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in b for k in b[i])


@pytest.mark.slurm
@pytest.mark.slow
def test_two_tasks_take_their_ranks_from_slurm(slurm_runs):
    root, returncodes = slurm_runs
    run = root / "two_tasks"
    assert returncodes["two_tasks"] == 0, submit_log(run)
    ranks = [probe(run, 0, r) for r in range(2)]
    for rank, record in enumerate(ranks):
        env = record["env"]
        assert record["cluster_environment"] == "SLURMEnvironment"
        assert (
            (record["global_rank"], record["local_rank"], record["world_size"])
            == (int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"]))
            == (rank, rank, 2)
        )
    assert ranks[0]["env"]["SLURM_JOB_ID"] == ranks[1]["env"]["SLURM_JOB_ID"]
    assert ranks[0]["end_step"] == ranks[1]["end_step"] == STEPS_PER_EPOCH * EPOCHS
    start, end0, end1 = ranks[0]["start_params"], ranks[0]["params"], ranks[1]["params"]
    assert all(torch.equal(end0[k], end1[k]) for k in end0), "the ranks' weights differ: gradients not all-reduced"
    assert sum(not torch.equal(start[k], end0[k]) for k in start) > len(start) // 2, "training changed almost nothing"
    assert final_checkpoint(run)["global_step"] == STEPS_PER_EPOCH * EPOCHS


@pytest.mark.slurm
@pytest.mark.parametrize(
    "override, message",
    [
        (
            "hydra.launcher.partition=no_such_partition",
            "hydra.launcher.partition=no_such_partition: no such partition on this cluster (sinfo lists: ",
        ),
        ("hardware.devices=2", "hydra.launcher.gpus_per_node=2, but partition "),
    ],
)
def test_bad_slurm_settings_are_named_before_submitting(cluster, override, message):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=mae_vit_tiny_synthetic", "hardware=slurm", override],
            return_hydra_config=True,
        )
    with pytest.raises(SystemExit) as exit_:
        SlurmPreflight().on_multirun_start(cfg)
    assert message in str(exit_.value.code)


@pytest.mark.slow
def test_slurm_without_sbatch_on_path_says_what_to_do(tmp_path):
    """Through the CLI: Hydra turns exceptions raised in its callbacks into warnings, so this checks the run stops."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mimlab.train",
            "-m",
            "experiment=mae_vit_tiny_synthetic",
            "hardware=slurm",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=REPO,
        env={**env(), "PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "hardware=slurm submits SLURM jobs, but sbatch, srun, sinfo are not on PATH" in proc.stderr
    assert "scripts/slurm_local.sh start" in proc.stderr and not (tmp_path / ".submitit").exists()
