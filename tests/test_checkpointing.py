"""Checkpoints are written when asked, hold the final state, survive Ctrl-C, and bad files give clear messages."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_MAE_QUIET, compose_config
from mimlab.checkpoints.atomic import AtomicCheckpointIO, CheckpointWriteError
from mimlab.train import build

TINY = TINY_MAE_QUIET


def test_every_n_train_steps_writes_last_at_each_nth_step_and_at_the_end(tmp_path, synthetic_root, monkeypatch):
    """60 train images, batch 5: 12 steps per epoch x 2 epochs; every 5 steps -> last.ckpt at 5, 10, 15, 20 and 24."""
    writes: list[tuple[str, int]] = []
    save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        writes.append((Path(path).name, checkpoint["global_step"]))
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    cfg = compose_config(
        [
            *TINY,
            f"data.root={synthetic_root}",
            "data.batch_size=5",
            "trainer.max_epochs=2",
            "callbacks.checkpoint.every_n_train_steps=5",
        ],
        tmp_path,
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 24
    assert [step for name, step in writes if name == "last.ckpt"] == [5, 10, 12, 15, 20, 24]
    assert sorted({step for name, step in writes if name.startswith("best")}) == [12, 24]  # best val/loss per epoch
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 24


def train_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m mimlab.train`` in its own session (a terminal's process group: DataLoader workers get signals too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "mimlab.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        start_new_session=True,
    )


@pytest.mark.slow
def test_ctrl_c_mid_epoch_saves_last_ckpt_and_prints_the_resume_hint(tmp_path, synthetic_root):
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("hardware.num_workers")]
    proc = train_cli(
        [
            *args,
            "hardware.num_workers=2",
            f"data.root={synthetic_root}",
            "data.batch_size=8",
            "trainer.max_epochs=2",
            f"hydra.run.dir={run_dir}",
            "+callbacks.kill._target_=mimlab.callbacks.fault_injection.KillAtStep",
            "+callbacks.kill.step=3",
            "+callbacks.kill.signal_name=SIGINT",
            "+callbacks.kill.process_group=true",
        ]
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3  # mid-epoch 0 (7 steps)
    assert f"Ctrl-C received: saved {last} at step 3; resume with ckpt_path={last}" in output


def test_a_full_disk_during_a_checkpoint_is_named_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """The kernel's ENOSPC, as torch.save meets it: the temporary file is opened on /dev/full."""
    import mimlab.checkpoints.atomic as atomic

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    real_mkstemp = atomic.tempfile.mkstemp

    def mkstemp_on_a_full_disk(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp_on_a_full_disk)
    with pytest.raises(
        CheckpointWriteError,
        match=rf"writing checkpoint {path} failed \(No space left on device; "
        r"\d+ MiB free there\); the previous checkpoint .* is intact\. Free disk",
    ):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(100_000)}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_a_short_write_reported_by_torch_is_named_as_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a failed write of its zip writer as this RuntimeError (seen writing to /dev/full)."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def short_write(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(
        CheckpointWriteError,
        match=rf"{path} failed \(a short write: the disk or a quota is full; "
        r"\d+ MiB free there\).*intact\. Free disk space",
    ):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_ckpts")
    good = folder / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(10_000)}}, good)
    noise = random.Random(0).randbytes(1000)  # seeded: the same bytes (and the same repr in the message) every run
    files = {"random": noise, "empty": b"", "truncated": good.read_bytes()[: good.stat().st_size // 2]}
    for name, content in files.items():
        (folder / f"{name}.ckpt").write_bytes(content)
    return {name: folder / f"{name}.ckpt" for name in files}


@pytest.mark.parametrize(
    "kind, looks_like",
    [
        ("random", r"1000 bytes, starting with b['\"]"),  # repr quotes with " when the bytes hold a '
        ("empty", "an empty file"),
        ("truncated", r"\d+ bytes, starting with b'PK"),
    ],
)
def test_a_corrupt_checkpoint_is_named_when_resuming(tmp_path, bad_checkpoints, kind, looks_like):
    from mimlab.checkpoints.files import CheckpointReadError
    from mimlab.train import run

    path = bad_checkpoints[kind]
    cfg = compose_config([*TINY, "data.root=/nonexistent/never-read", f"ckpt_path={path}"], tmp_path)
    with pytest.raises(CheckpointReadError, match=rf"{path} is not a PyTorch checkpoint \({looks_like}.*truncated"):
        run(cfg)


def test_a_corrupt_checkpoint_is_named_as_pretrained_weights_and_on_export(tmp_path, bad_checkpoints):
    from mimlab.checkpoints.export import export
    from mimlab.checkpoints.files import CheckpointReadError

    path = bad_checkpoints["random"]
    cfg = compose_config(
        [
            "experiment=finetune_vit_tiny_synthetic",
            f"task.pretrained={path}",
            "logger=csv",
            "data.root=/nonexistent/never-read",
        ],
        tmp_path,
    )
    with pytest.raises(CheckpointReadError, match=rf"{path} is not a PyTorch checkpoint"):
        build(cfg)
    with pytest.raises(CheckpointReadError, match=rf"{path} is not a PyTorch checkpoint"):
        export(path, tmp_path / "out.pth")
