"""``make gpu-check`` (``scripts/gpu_check.py``) in its CPU mode: every check of the GPU acceptance run runs at tiny size
and reports."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
# a script, not a module of the package; registered before it runs, as its dataclasses look it up in sys.modules
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
spec.loader.exec_module(gpu_check)  # type: ignore[union-attr]
CPU_SIZES, GPU_SIZES, plan = gpu_check.CPU_SIZES, gpu_check.GPU_SIZES, gpu_check.plan


def test_the_gpu_plan_covers_every_paper_recipe_ddp_bench_workload_and_loader(tmp_path):
    checks = plan(tmp_path, GPU_SIZES)
    names = {c.name for c in checks}
    assert {
        "train/mae_vit_b",
        "train/fcmae_convnextv2_base",
        "train/itpn_base_pixel",
        "train/img2vec_vit_b",
        "train/mae_vit_b_ddp1",
        "loader/imagenet",
        "loader/imagenet_gpu_decode",
    } <= names
    benches = [c for c in checks if c.name.startswith("bench/")]
    assert len(benches) == 6 and all("compile=[false,true]" in c.argv for c in benches)
    assert {c.name.split("/")[1] for c in benches} == {
        c.name.split("/")[1] for c in checks if c.name.startswith("warm/")
    }
    train = next(c for c in checks if c.name == "train/mae_vit_b")
    assert "hardware=gpu" in train.argv and "experiment=mae_vit_b" in train.argv
    assert "hardware=ddp" in next(c for c in checks if c.name == "train/mae_vit_b_ddp1").argv
    assert not any(c.name.startswith("warm/") for c in plan(tmp_path, CPU_SIZES))  # the CPU mode times eager only


@pytest.mark.slow
def test_cpu_mode_runs_every_check_and_writes_the_reports(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--mode", "cpu", "--out", str(out), "--budget", "900"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    results = json.loads((out / "results.json").read_text())
    failed = {c["name"]: c["error"] for c in results["checks"] if c["status"] != "ok"}
    assert proc.returncode == 0 and not failed, failed or proc.stdout[-3000:]
    by_name = {c["name"]: c for c in results["checks"]}
    assert by_name["bench/mae_vit_b"]["figures"]["plain_eager"]["img_s"] > 0
    assert "lightning_overhead_eager" in by_name["bench/mae_vit_b"]["figures"]
    for name in (
        "train/mae_vit_b",
        "train/fcmae_convnextv2_base",
        "train/itpn_base_pixel",
        "train/img2vec_vit_b",
        "train/mae_vit_b_ddp1",
    ):
        figures = by_name[name]["figures"]
        assert figures["last_ckpt"] and figures["last_step"] == CPU_SIZES.train_steps - 1, (name, figures)
    assert by_name["loader/imagenet_gpu_decode"]["figures"]["img_s"] > 0
    report = (out / "results.md").read_text()
    assert "| mae_vit_b | 4 |" in report and "loader" not in failed
