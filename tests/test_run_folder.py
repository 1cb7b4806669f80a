"""A run folder belongs to one run: never shared by two runs at once, never reused by a new run, resumed only on purpose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_generated_data import snapshot

from conftest import TINY_MAE_QUIET, compose_config
from mimlab.run_folder import STATE, RunFolder, RunFolderError
from mimlab.train import run

TINY = [*TINY_MAE_QUIET, "data.batch_size=8"]


def finished_run(folder: Path) -> Path:
    """A folder as a finished run leaves it: config, metrics, checkpoints and its state record."""
    for name, text in (
        (".hydra/config.yaml", "name: old\n"),
        ("csv/metrics.csv", "step,train/loss\n0,1.0\n"),
        ("checkpoints/last.ckpt", "weights"),
    ):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / STATE).write_text(json.dumps({"status": "finished", "step": 70, "started": "2026-01-01T10:00:00"}))
    return folder


def test_a_new_run_is_refused_in_a_folder_that_holds_a_run(tmp_path):
    folder = finished_run(tmp_path / "old")
    with pytest.raises(
        RunFolderError,
        match=r"(?s)old already holds a run \(finished, at step 70, started 2026-01-01"
        r"T10:00:00\).*never reuses.*ckpt_path=.*old/checkpoints/last\.ckpt",
    ):
        RunFolder.claim(folder)
    with pytest.raises(RunFolderError, match="already holds a run"):  # 'last' does not restart a finished run
        RunFolder.claim(folder, "last")
    with pytest.raises(RunFolderError, match="already holds a run"):  # nor does another run's checkpoint
        RunFolder.claim(folder, str(tmp_path / "elsewhere" / "last.ckpt"))
    claim = RunFolder.claim(folder, str(folder / "checkpoints" / "last.ckpt"))  # resuming it explicitly is fine
    claim.release("finished", 80)
    assert json.loads((folder / STATE).read_text())["step"] == 80


def test_a_folder_without_outputs_may_be_used(tmp_path):
    folder = tmp_path / "crashed_at_start"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("name: x\n")
    RunFolder.claim(folder).release("finished", 0)
    unfinished = finished_run(tmp_path / "preempted")
    (unfinished / STATE).write_text(json.dumps({"status": "running", "step": None}))
    RunFolder.claim(unfinished, "last").release("finished", 5)  # a requeued job resumes its own unfinished run


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path, synthetic_root):
    folder = tmp_path / "shared"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from mimlab.run_folder import RunFolder; RunFolder.claim(sys.argv[1]); "
                "print('claimed', flush=True); time.sleep(60)"
            ),
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        cfg = compose_config([*TINY, f"data.root={synthetic_root}", "trainer.max_steps=2"], folder)
        with pytest.raises(
            RunFolderError, match=rf"run folder {folder} is in use by another run \(pid {holder.pid} on"
        ):
            run(cfg)
        assert not (folder / "checkpoints").exists() and not (folder / "csv").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "case, status, error",
    [
        ("fails while being built", "failed", "ValueError: data.batch_size must be >= 1"),
        ("refused after its folder was claimed", "refused", "ConfigMismatchError: "),
    ],
)
def test_a_run_that_fails_or_is_refused_after_claiming_its_folder_records_it(
    tmp_path, synthetic_root, case, status, error
):
    """As on the command line: RunFolderGuard claims the folder before the run is built."""
    folder = tmp_path / "run"
    args = [*TINY, f"data.root={synthetic_root}"]
    ckpt = None
    if case.startswith("refused"):
        saved = OmegaConf.to_container(compose_config([*args, "masking.ratio=0.5"], folder), resolve=True)
        ckpt = folder / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        torch.save({"mimlab": {"config": saved}}, ckpt)
        args.append(f"ckpt_path={ckpt}")
    else:
        args.append("data.batch_size=0")
    RunFolder.claim(folder, None if ckpt is None else str(ckpt))
    with pytest.raises(Exception, match=error.split(": ", 1)[1]):
        run(compose_config(args, folder))
    state = json.loads((folder / STATE).read_text())
    assert state["status"] == status and state["error"].startswith(error) and state["pid"] == os.getpid()
    RunFolder.claim(folder, None if ckpt is None else str(ckpt)).release("finished")  # the folder is free again


def train_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "mimlab.train", *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.mark.slow
def test_cli_refuses_a_finished_runs_folder_and_resumes_it_only_explicitly(tmp_path, synthetic_root):
    folder = tmp_path / "run"
    args = [*TINY, f"data.root={synthetic_root}", f"hydra.run.dir={folder}"]
    first = train_cli([*args, "trainer.max_epochs=1"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(folder)

    started = time.time()
    again = train_cli([*args, "trainer.max_epochs=3", "masking.ratio=0.5"])
    assert again.returncode == 1 and f"run folder {folder} already holds a run (finished, at step 7" in again.stderr
    assert snapshot(folder) == before  # .hydra/config.yaml, csv/metrics.csv and the checkpoints untouched
    assert time.time() - started < 60  # refused at start, nothing trained

    last = folder / "checkpoints" / "last.ckpt"
    resumed = train_cli([*args, "trainer.max_epochs=2", f"ckpt_path={last}", "allow_schedule_change=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 14
    assert sorted(p.name for p in (folder / "checkpoints").glob("last*")) == ["last.ckpt"]  # no last-v1.ckpt
