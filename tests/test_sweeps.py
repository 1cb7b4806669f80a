"""Hydra multirun end to end on CPU: two jobs -> two run folders with distinct configs, one offline wandb run each
(grouped by sweep, tagged with the overrides, with the dashboard keys), and the report tool's table built from them.
Plus: every conf/sweep/*.yaml composes and names only keys that exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import TINY_MAE_DECODER, TINY_VIT
from mimlab.report import report
from mimlab.train import CONFIG_DIR
from mimlab.utils.resolvers import MAX_DIRNAME, dirname, job_dirname
from mimlab.utils.wandb_offline import summarise_run

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (Path(CONFIG_DIR) / "sweep").glob("*.yaml"))
TINY = [
    "experiment=mae_vit_tiny_synthetic",
    "data.img_size=32",
    "data.batch_size=8",
    "hardware.num_workers=0",
    *TINY_VIT,
    *TINY_MAE_DECODER,
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.knn.max_train=20",
    "~callbacks.progress",
    "~callbacks.reconstruction",
]


@pytest.mark.slow
def test_two_job_multirun_gives_two_runs_one_wandb_group_and_a_report(tmp_path, synthetic_root):
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    cmd = [
        sys.executable,
        "-m",
        "mimlab.train",
        "-m",
        *TINY,
        "masking.ratio=0.5,0.75",
        f"data.root={synthetic_root}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0_masking.ratio=0.5", "1_masking.ratio=0.75"]  # only the swept key
    ratios = [OmegaConf.load(p / ".hydra" / "config.yaml").masking.ratio for p in runs]
    assert ratios == [0.5, 0.75]

    wandb_runs = [summarise_run(next((p / "wandb").glob("offline-run-*/run-*.wandb"))) for p in runs]
    assert wandb_runs[0]["group"] == wandb_runs[1]["group"] == f"{tmp_path.name}/sweep"
    assert wandb_runs[0]["name"] != wandb_runs[1]["name"]
    for summary, ratio in zip(wandb_runs, ratios):
        assert f"masking.ratio={ratio}" in summary["tags"] and summary["job_type"] == "sweep"
        assert summary["config"]["masking"]["ratio"] == ratio
        assert f"masking.ratio={ratio}" in summary["config"]["hydra"]["overrides"]
        assert {
            "train/loss_step",
            "val/loss",
            "lr/pg1",
            "train/grad_norm",
            "knn/acc1",
            "perf/train_gflops_per_img",
        } <= summary["history_keys"]

    result = report([sweep_dir], out=tmp_path / "report", x="masking.ratio", y=["val/loss", "knn/acc1"])
    assert result["keys"] == ["masking.ratio"]
    lines = result["markdown"].splitlines()
    assert lines[0] == "| run | masking.ratio | val/loss | knn/acc1 | steps |"
    assert lines[2].startswith("| job 0 | 0.5 |") and lines[3].startswith("| job 1 | 0.75 |")
    assert result["plot"].stat().st_size > 5000


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_file_composes_and_names_real_keys(sweep, tmp_path):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"+sweep={sweep}", f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, f"conf/sweep/{sweep}.yaml has no hydra.sweeper.params"
    groups = {p.parent.relative_to(CONFIG_DIR).as_posix() for p in Path(CONFIG_DIR).glob("**/*.yaml")}
    experiments = str(params.get("experiment", "")).split(",")
    for experiment in experiments:
        assert experiment and (Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").exists(), experiment
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            job = compose("train", overrides=[f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
        for key in params:
            if key.lstrip("+~") in groups:
                continue
            assert OmegaConf.select(job, key.lstrip("+~"), default="__missing__") != "__missing__", (
                f"conf/sweep/{sweep}.yaml sweeps '{key}', which experiment={experiment} does not have"
            )
    assert f"/{sweep}/" in cfg.hydra.sweep.dir


def test_job_folder_names_stay_short_unique_and_flat():
    long_a = ",".join(f"model.backbone.key{i}={i}" for i in range(30))
    long_b = long_a.replace("key29=29", "key29=30")
    assert len(dirname(long_a)) <= MAX_DIRNAME and dirname(long_a) != dirname(long_b)
    assert dirname("data.root=/a/b,masking.ratio=0.5") == "data.root=_a_b,masking.ratio=0.5"


def test_job_folder_shows_only_the_swept_keys(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "overrides": {"task": ["masking.ratio=0.4,0.6", "trainer.max_epochs=4", "+sweep=s"]},
                    "sweeper": {"params": {"model.decoder.depth": "range(1,9,7)", "data.img_size": 32}},
                }
            }
        )
    )
    name = job_dirname(tmp_path, "data.img_size=32,masking.ratio=0.6,model.decoder.depth=8,trainer.max_epochs=4")
    assert name == "masking.ratio=0.6,model.decoder.depth=8"
    assert job_dirname(tmp_path / "elsewhere", "a=1,b=2") == "a=1,b=2"  # no multirun.yaml: every override


def test_makefile_sweep_target_runs_the_named_sweep():
    out = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "sweep", "SWEEP=conf/sweep/mae_mask_ratio.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "-m mimlab.train -m +sweep=mae_mask_ratio" in out.stdout, out.stdout + out.stderr
