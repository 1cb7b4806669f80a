"""The ``mimlab-*`` console scripts of pyproject.toml and their ``--help``; the optional extras (slurm, shards,
coco): what installs them, and the message naming ``pip install 'mimlab[<extra>]'`` when a picked option needs one
that is missing."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import tomllib
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config
from mimlab.utils.extras import OPTIONAL_MODULES, MissingExtraError, require

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
TOOLS = ["train", "check", "eval", "export", "report", "bench", "token-diversity", "feature-cosine"]


def run_helps(scripts: dict[str, str]) -> dict[str, dict]:
    """name -> {"code": exit status, "out": stdout} of ``<name> --help`` for each ``module:function`` console script,
    called as pip's generated wrapper calls it: ``sys.exit(function())``."""
    results = {}
    for name, target in scripts.items():
        module, function = target.split(":")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), mock.patch.object(sys, "argv", [name, "--help"]):
            try:
                sys.exit(getattr(importlib.import_module(module), function)())
            except SystemExit as done:
                code = done.code
        results[name] = {"code": code if code is None or isinstance(code, int) else repr(code), "out": out.getvalue()}
    return results


def test_every_user_facing_tool_has_a_console_script():
    scripts = PROJECT["scripts"]
    assert sorted(scripts) == sorted(f"mimlab-{tool}" for tool in TOOLS)
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.fixture(scope="module", params=["in-process", pytest.param("fresh-interpreter", marks=pytest.mark.slow)])
def helps(request) -> dict[str, dict]:
    """:func:`run_helps` of every console script, in this process or (slow: imports take ~15 s) in a new interpreter."""
    if request.param == "in-process":
        return run_helps(PROJECT["scripts"])
    paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "import json; from test_cli import PROJECT, run_helps; print(json.dumps(run_helps(PROJECT['scripts'])))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "tool, expected",
    [
        ("train", ["== Configuration groups ==", "experiment: ", "hardware: cpu, ddp, gpu, slurm", "== Config =="]),
        ("check", ["== Configuration groups ==", "experiment: ", "data: "]),
        (
            "eval",
            ["usage: mimlab-eval ckpt=PATH", "features=FOLDER", "hardware=ddp", "img_size ", "pool ", "baseline "],
        ),
        (
            "export",
            [
                "usage: mimlab-export ckpt=PATH",
                "ckpt ",
                "format ",
                "out ",
                "ema ",
                "num_heads ",
                "timm.create_model(model_name",
            ],
        ),
        ("report", ["--x X", "--y Y", "--hue HUE", "--agg {last,max,min,median}", "--out OUT"]),
        ("bench", ["usage: mimlab-bench [key=value ...]", "workloads (model=...): mae_vit_b"]),
        ("token-diversity", ["teacher:", "checkpoint:", "data:", "plot:"]),
        ("feature-cosine", ["--checkpoint CHECKPOINT", "--images IMAGES", "--backbone BACKBONE", "--max-images"]),
    ],
)
def test_help_lists_the_options(helps, tool, expected):
    result = helps[f"mimlab-{tool}"]
    assert result["code"] in (0, None), result
    missing = [text for text in expected if text not in result["out"]]
    assert not missing, f"mimlab-{tool} --help lacks {missing}:\n{result['out']}"


def test_bench_help_lists_every_key_of_bench_yaml_with_its_comment(helps):
    out = helps["mimlab-bench"]["out"]
    config = OmegaConf.load(REPO / "conf" / "bench.yaml")
    lines = {line.split()[0].split("=")[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert sorted(lines) == sorted(k for k in config if k != "workloads")
    assert "timed steps per window" in lines["steps"] and "MFU is against this" in lines["peak_tflops"]


# ----------------------------------------------------------------------------------------------- extras
def test_optional_packages_are_extras_and_make_install_takes_them_all():
    core = " ".join(PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    for distribution, extra in OPTIONAL_MODULES.values():
        assert distribution not in core
        assert any(req.startswith(distribution) for req in extras[extra]), (distribution, extra)
    assert extras["all"] == [f"mimlab[{','.join(e for _, e in OPTIONAL_MODULES.values())}]"]
    for package in ("torch", "lightning", "hydra-core", "timm", "torchmetrics", "wandb"):
        assert package in core
    assert '-e ".[dev,all]"' in (REPO / "Makefile").read_text()


@pytest.mark.parametrize("module", list(OPTIONAL_MODULES))
def test_a_missing_optional_package_names_its_extra(module, monkeypatch):
    distribution, extra = OPTIONAL_MODULES[module]
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    with pytest.raises(MissingExtraError) as err:
        require(module, "the feature")
    assert str(err.value).startswith(f"the feature needs the optional package {distribution}, which is not installed")
    assert f"pip install 'mimlab[{extra}]'" in str(err.value)


def test_hardware_slurm_without_the_launcher_names_the_slurm_extra(monkeypatch, capsys):
    from mimlab import train

    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)
    monkeypatch.setattr(sys, "argv", ["mimlab-train", "-m", "experiment=mae_vit_b", "hardware=slurm"])
    with pytest.raises(SystemExit) as err:
        train.cli()
    assert str(err.value).startswith(
        "hardware=slurm (SLURM jobs through submitit) needs the optional package hydra-submitit-launcher"
    )
    assert "pip install 'mimlab[slurm]'" in str(err.value)
    train.require_launcher(["hardware=gpu", "data.root=/slurm"])  # not picked: no launcher needed


def test_coco_options_without_pycocotools_name_the_coco_extra(monkeypatch):
    for module in ("mimlab.data.coco", "mimlab.data.ade20k"):
        importlib.import_module(module)
        monkeypatch.delitem(sys.modules, module)  # imported afresh below, put back afterwards
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    importlib.import_module("mimlab.data.ade20k")  # ADE20K segmentation (it reads images through mimlab.data.coco)
    cfg = compose_config(["experiment=detect_mae_vit_tiny_synthetic"])
    for part, feature in ((cfg.data, "COCO data"), (cfg.task, "task=detect")):
        with pytest.raises(Exception, match=rf"(?s){feature}.*pip install 'mimlab\[coco\]'"):
            instantiate(part)


def test_writing_shards_without_webdataset_names_the_shards_extra(monkeypatch, synthetic_root, tmp_path):
    from mimlab.data import shards

    monkeypatch.setitem(sys.modules, "webdataset", None)
    monkeypatch.setattr(sys, "argv", ["mimlab.data.shards", "--src", str(synthetic_root), "--dst", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"Writing shards .* pip install 'mimlab\[shards\]'"):
        shards.main()
    assert not list(tmp_path.iterdir())  # stopped before writing anything


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_passes_paths_with_spaces_quotes_and_non_ascii_letters_as_one_value(tmp_path):
    data, ckpt = "/data/my images/é's (1)", "/runs/a b/ü/last.ckpt"
    proc = subprocess.run(
        ["make", "-s", "-n", "-o", ".venv/.installed", "linear-probe", f"DATA={data}", f"CKPT={ckpt}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout.strip().splitlines()[-1])
    cfg = compose_config(words[words.index("mimlab.train") + 1 :], tmp_path)
    assert (cfg.data.root, cfg.task.pretrained) == (data, ckpt)
