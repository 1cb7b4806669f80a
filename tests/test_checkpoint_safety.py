"""No checkpoint runs code: every entry point that reads a user-given file (``ckpt_path=``, Lightning's own resume load,
``task.pretrained=``, ``mimlab-export``, the frozen and CLIP teachers) loads it weights-only, so a file whose pickle
carries a side effect is refused before that side effect happens; mimlab's own checkpoints load weights-only; an old
checkpoint converted with the one-liner of the refusal resumes; a folder given as a checkpoint is named as one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import ListConfig
from torch import nn

from conftest import TINY_MAE_QUIET, compose_config
from mimlab.checkpoints.export import export, main as export_main
from mimlab.checkpoints.files import UnsafeCheckpointError, load_file
from mimlab.optim.schedule import _Warmup
from mimlab.targets.clip_teacher import load_teacher_weights
from mimlab.targets.frozen_teacher import load_teacher_checkpoint
from mimlab.train import build, run

TINY = [*TINY_MAE_QUIET, "data.batch_size=8", "trainer.limit_val_batches=0", "callbacks.checkpoint.monitor=null"]


class SideEffect:
    """Unpickling it creates ``marker`` (as ``os.system(...)`` would run a command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> Path:
    """A mimlab run folder after 2 steps of the tiny MAE (checkpoints/last.ckpt)."""
    folder = tmp_path_factory.mktemp("trained")
    cfg = compose_config([*TINY, f"data.root={synthetic_root}", "trainer.max_steps=2"], folder)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return folder


@pytest.fixture
def hostile(trained, tmp_path) -> tuple[Path, Path]:
    """(a copy of the trained checkpoint that also pickles a side effect, the marker file it would create)."""
    marker = tmp_path / "code-ran"
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["payload"] = SideEffect(marker)
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, path)
    return path, marker


UNSAFE = r"(?s)hostile\.ckpt holds .*open.*needs a full unpickle.*refuses it.*weights_only_form"


def test_resuming_a_hostile_checkpoint_is_refused_before_its_code_runs(hostile, synthetic_root, tmp_path):
    path, marker = hostile
    cfg = compose_config([*TINY, f"data.root={synthetic_root}", "trainer.max_steps=4", f"ckpt_path={path}"], tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=UNSAFE):
        run(cfg)  # the resume-config check reads the file first
    datamodule, module, trainer = build(cfg)
    with pytest.raises(UnsafeCheckpointError, match=UNSAFE):
        trainer.fit(module, datamodule=datamodule, ckpt_path=path, weights_only=False)  # Lightning's own load
    assert not marker.exists()


def test_hostile_pretrained_weights_export_and_teachers_are_refused(hostile, tmp_path):
    path, marker = hostile
    cfg = compose_config(
        ["experiment=finetune_vit_tiny_synthetic", "logger=csv", f"task.pretrained={path}"], tmp_path / "ft"
    )
    with pytest.raises(UnsafeCheckpointError, match=UNSAFE):
        build(cfg)
    with pytest.raises(UnsafeCheckpointError, match=UNSAFE):
        export(path, tmp_path / "out.pth")
    with pytest.raises(UnsafeCheckpointError, match=UNSAFE):
        export_main([f"ckpt={path}"])
    for load_teacher in (load_teacher_checkpoint, load_teacher_weights):
        with pytest.raises(UnsafeCheckpointError, match=UNSAFE):
            load_teacher(nn.Linear(2, 2), path)
    assert not marker.exists()


def test_every_mimlab_checkpoint_loads_weights_only(trained):
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["rng_states"]["numpy"][1].shape == (624,)


def test_an_old_checkpoint_converted_with_the_refusals_one_liner_resumes(trained, synthetic_root, tmp_path):
    """A checkpoint as mimlab wrote them before: numpy RNG state, OmegaConf hyper-parameters, schedule objects."""
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    name, keys, *rest = checkpoint["rng_states"]["numpy"]
    checkpoint["rng_states"]["numpy"] = (name, keys.numpy().astype(np.uint32), *rest)
    checkpoint["hyper_parameters"] = {"anchor_sizes": ListConfig([8, 16])}
    checkpoint["warmup"] = _Warmup(steps_per_epoch=1.0, epochs=1.0, warmup_epochs=0.0, warmup_steps=2, warmup_ratio=0.5)
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_file(old)
    one_liner = re.search(r'\n  (python -c ".*")$', str(refused.value)).group(1)
    subprocess.run(sys.executable + one_liner.removeprefix("python"), shell=True, check=True, cwd=tmp_path)
    converted = load_file(tmp_path / "old.weights_only.ckpt")
    assert converted["hyper_parameters"] == {"anchor_sizes": [8, 16]}
    assert converted["warmup"] == {"steps_per_epoch": 1.0, "length": 2, "ratio": 0.5}

    cfg = compose_config(
        [*TINY, f"data.root={synthetic_root}", "trainer.max_steps=3", "allow_schedule_change=true"],
        tmp_path / "resumed",
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "old.weights_only.ckpt")
    assert trainer.global_step == 3


def test_a_folder_given_as_a_checkpoint_is_named_as_a_folder(trained, tmp_path):
    last = trained / "checkpoints" / "last.ckpt"
    message = rf"checkpoint {trained} is a directory, not a checkpoint file; did you mean {last}\?"
    cfg = compose_config([*TINY, "data.root=/nonexistent/never-read", f"ckpt_path={trained}"], tmp_path / "a")
    with pytest.raises(IsADirectoryError, match=message):
        run(cfg)
    cfg = compose_config(
        ["experiment=finetune_vit_tiny_synthetic", "logger=csv", f"task.pretrained={trained}"], tmp_path / "b"
    )
    with pytest.raises(IsADirectoryError, match=message):
        build(cfg)
    with pytest.raises(IsADirectoryError, match=rf"checkpoint {tmp_path} is a directory.*<run>/checkpoints/last\.ckpt"):
        export(tmp_path)


@pytest.mark.parametrize("module", ["itpn", "convnextv2", "load", "files", "encoder", "export"])
def test_every_checkpoint_module_imports_first_in_a_fresh_process(module):
    """No import circle among the checkpoint modules (itpn.py read through load.py, which imports itpn.py)."""

    proc = subprocess.run(
        [sys.executable, "-c", f"import mimlab.checkpoints.{module}"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_one_reader_unwraps_official_lightning_and_teacher_files_alike():
    from mimlab.checkpoints.files import read_state_dict
    from mimlab.targets.frozen_teacher import TEACHER_PREFIXES

    w = torch.zeros(2)
    assert read_state_dict({"state_dict": {"backbone.x": w}, "epoch": 3}) == {"backbone.x": w}  # Lightning
    assert read_state_dict({"model": {"module.blocks.0.w": w}}) == {"blocks.0.w": w}  # MAE-style, DDP prefix
    assert read_state_dict({"model_state": {"w": w}}) == {"w": w}  # MaskFeat / SlowFast
    dino = {"student": {"module.backbone.w": w}, "teacher": {"module.backbone.w": w + 1}}
    assert torch.equal(read_state_dict(dino, TEACHER_PREFIXES)["w"], w + 1)  # the teacher, prefixes stripped
