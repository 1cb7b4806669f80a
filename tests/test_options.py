"""Every option is checked at start, before any data is read, with a message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MAE, compose_config
from mimlab.tasks.pretrain import CompositionError
from mimlab.train import CONFIG_DIR, run
from mimlab.utils.options import OptionError, option_problems

NO_DATA = "data.root=/nonexistent/never-read"  # every check below must fire before this folder is looked at
TINY = [*TINY_MAE, NO_DATA]


@pytest.mark.parametrize(
    "override, message",
    [
        ("masking.ratio=abc", r"masking\.ratio='abc': Input should be a valid number.*RandomMasking argument ratio"),
        ("nan_guard=skp", r"nan_guard='skp': Input should be 'stop', 'skip' or 'off'"),
        ("data.on_corrupt=ignore", r"data\.on_corrupt='ignore': Input should be 'fail' or 'skip'"),
        ("trainer.precision=fp8", r"trainer\.precision='fp8': Input should be"),
        ("data.batch_size=eight", r"data\.batch_size='eight': Input should be a valid integer"),
    ],
)
def test_a_value_of_the_wrong_kind_is_named_before_anything_is_built(tmp_path, override, message):
    with pytest.raises(OptionError, match=message):
        run(compose_config([*TINY, override], tmp_path))


def test_all_problems_are_listed_at_once(tmp_path):
    cfg = compose_config([*TINY, "masking.ratio=abc", "nan_guard=skp", "data.img_size=32.5"], tmp_path)
    assert sorted(p.split("=")[0] for p in option_problems(cfg)) == ["data.img_size", "masking.ratio", "nan_guard"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=-1", r"data\.batch_size must be >= 1 \(images per process\), got -1"),
        (
            "masking.ratio=0",
            r"masking\.ratio must be in \(0, 1\) \(0 masks nothing: the masked-unit loss is 0\), got 0",
        ),
        ("masking.ratio=1.5", r"masking\.ratio must be in \(0, 1\)"),
    ],
)
def test_a_value_out_of_range_is_named_at_build(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run(compose_config([*TINY, override], tmp_path))


def test_a_mask_that_hides_every_unit_fails_before_training(tmp_path):
    """FCMAE at 32 px: one 32-px unit, ratio 0.6 keeps int(1 x 0.4) = 0 units: every image fully masked."""
    cfg = compose_config(
        [
            "experiment=fcmae_convnextv2_atto_synthetic",
            "data.img_size=32",
            "hardware.num_workers=0",
            "logger=csv",
            NO_DATA,
        ],
        tmp_path,
    )
    with pytest.raises(
        CompositionError,
        match=r"masking\.ratio=0\.6 over 1 mask unit\(s\) of 32 px keeps "
        r"int\(1 x 0\.4\) = 0 visible: every image would be fully masked",
    ):
        run(cfg)


@pytest.mark.slow  # a new interpreter (~8 s); the fast tier keeps one CLI subprocess test
def test_an_empty_command_line_value_is_refused(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mimlab.train",
            "experiment=finetune_vit_tiny_synthetic",
            "task.pretrained=",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 1
    assert "task.pretrained= has no value (an unset shell variable?)" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_every_recipe_passes_the_option_check_on_every_hardware(tmp_path):
    experiments = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
    for experiment in experiments:
        for hardware in ("cpu", "ddp", "slurm"):
            cfg = compose_config([f"experiment={experiment}", f"hardware={hardware}"], tmp_path)
            assert option_problems(cfg) == [], (experiment, hardware)
