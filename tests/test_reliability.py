"""Bad input and numerical trouble give clear errors and lose nothing."""

import errno
import random

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_MAE, compose_config
from mimlab.callbacks.resume import collect_rng_states, restore_rng_states
from mimlab.checkpoints.atomic import AtomicCheckpointIO, CheckpointWriteError
from mimlab.tasks.pretrain import CompositionError
from mimlab.train import build, preflight, run

TINY = TINY_MAE


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt.*No space left.*previous.*intact.*Free disk space"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


def test_unwritable_run_folder_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = compose_config(TINY, blocker / "run")
    _, module, _ = build(cfg)
    with pytest.raises(PermissionError, match=r"run folder .*a_file/run is not writable.*hydra\.run\.dir"):
        preflight(cfg, module)


def test_parts_that_do_not_fit_fail_before_data_is_read(tmp_path):
    cfg = compose_config([*TINY, "masking.unit_size=12", "data.root=/nonexistent"], tmp_path)
    with pytest.raises(CompositionError, match=r"do not fit together.*unit_size.*MaskedViT"):
        run(cfg)


def test_rng_states_survive_a_checkpoint_round_trip(tmp_path):
    def draws():
        return (
            torch.rand(4).tolist(),
            nn.functional.dropout(torch.ones(16), 0.5).tolist(),
            np.random.rand(3).tolist(),
            [random.random() for _ in range(3)],
        )

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save({"rng_states": collect_rng_states()}, tmp_path / "rng.ckpt")
    expected = draws()
    assert draws() != expected  # the generators moved on
    restore_rng_states(torch.load(tmp_path / "rng.ckpt", weights_only=False)["rng_states"])
    assert draws() == expected
