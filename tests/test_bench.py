"""``python -m mimlab.bench`` in its CPU tiny mode: correctness of the figures and the JSON, not speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY_VIT
from mimlab.bench import ExperimentWorkload, load_config, quiet_step, run
from mimlab.train import CONFIG_DIR
from mimlab.utils.fast_paths import set_fused_attn
from mimlab.utils.flops import conv_linear_macs, flops_method, train_flops_per_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_json(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    run(
        [
            "model=mae_vit_b,vit_b_finetune,fcmae_convnextv2_b",
            "batch=4",
            "steps=2",
            "warmup=1",
            "repeats=3",
            "compile=[false]",
            f"data_root={synthetic_root}",
            "workers=0",
            f"out={out}",
            "device=cpu",
            "datapath_batches=2",
            "datapath_batch=8",
            "datapath_img_size=32",
        ]
    )
    return json.loads(out.read_text())


def test_bench_reports_every_figure_for_each_loop(bench_json):
    assert bench_json["peak_tflops"] == 790
    by_model = {r["model"]: r for r in bench_json["results"]}
    assert by_model["fcmae_convnextv2_b"]["flops_method"] == "analytic"
    for name in ("mae_vit_b", "vit_b_finetune", "fcmae_convnextv2_b"):
        res = by_model[name]
        assert res["tiny"] and res["train_gflop_per_img"] > 0
        assert {r["loop"] for r in res["runs"]} == {"plain", "lightning"}
        for r in res["runs"]:
            assert r["img_s"] > 0 and r["ms_step"] > 0 and r["windows"] == 3
            assert r["img_s_min"] <= r["img_s"] <= r["img_s_max"]
            assert r["spread"] == pytest.approx((r["img_s_max"] - r["img_s_min"]) / r["img_s"])
            assert r["img_s"] == pytest.approx(4 * 1000 / r["ms_step"])
            assert r["mfu"] == pytest.approx(r["img_s"] * res["train_gflop_per_img"] * 1e9 / 790e12)
        assert "lightning_overhead_eager" in res
        real = res["real_data"]
        assert real["loader_img_s"] > 0 and real["end_to_end"]["img_s"] > 0
    data = bench_json["datapath"]
    assert not data["generated"] and len(data["ratio_per_round"]) == 3 and data["ratio_median"] > 0
    assert data["ratio_per_round"] == pytest.approx(
        [a / b for a, b in zip(data["mimlab_img_s"], data["official_img_s"])]
    )
    assert len(data["ratio_workers_per_round"]) == 3 and data["ratio_workers_median"] > 0


def test_timing_windows_and_their_summary():
    from mimlab.bench.timing import is_boundary, summarize

    starts = [s for s in range(20) if is_boundary(s, warmup=2, steps=5, repeats=3)]
    assert starts == [2, 7, 12]  # three windows of five steps after two warm-up steps
    figures = summarize(8, 5, [1.0, 2.0, 4.0], torch.device("cpu"))
    assert figures["img_s"] == 20.0 and figures["img_s_min"] == 10.0 and figures["img_s_max"] == 40.0
    assert figures["spread"] == pytest.approx(1.5) and figures["ms_step"] == pytest.approx(400.0)


def test_bench_names_a_missing_recipe_or_tiny_setting():
    assert "conf/experiment/no_such_recipe.yaml does not exist" in ExperimentWorkload("no_such_recipe").unavailable(
        tiny=False
    )
    assert "tiny_overrides" in ExperimentWorkload("mae_vit_b").unavailable(tiny=True)
    assert ExperimentWorkload("mae_vit_b").unavailable(tiny=False) is None


def test_flop_method_follows_the_model():
    assert flops_method(nn.Sequential(nn.Conv2d(8, 8, 7, groups=8))) == "analytic"
    assert flops_method(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2))) == "counter"
    assert flops_method(nn.Sequential(nn.Conv2d(32, 32, 3, groups=16))) == "counter"  # grouped, not depthwise


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_counter_counts_each_conv_gradient_as_one_forward_conv(groups):
    """torch's convolution-backward formula ignores groups for the weight gradient; ours counts the real products."""
    net = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=groups), nn.Conv2d(32, 32, 3, padding=1, groups=groups))
    x = torch.randn(2, 32, 8, 8)
    one_conv = 2 * 32 * (32 // groups) * 9 * 64  # FLOPs of one forward convolution per image
    # first conv: forward + weight gradient (the input needs none); second: forward + input and weight gradients
    assert train_flops_per_image(net, lambda: net(x).sum(), 2, "counter") == (2 + 3) * one_conv


def test_unknown_model_names_the_config():
    with pytest.raises(SystemExit, match="conf/bench.yaml"):
        run(["model=nope", "device=cpu"])
    with pytest.raises(SystemExit, match="key=value"):
        load_config(["model"])


def test_conv_linear_macs_matches_the_hand_count():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
    )
    macs = conv_linear_macs(net, lambda: net(torch.randn(2, 3, 6, 6)))
    assert macs == 2 * (8 * 36 * 3 * 9 + 8 * 36 * 1 * 49 + 5 * 288)


def test_flop_counter_counts_attention_whichever_kernel_runs():
    cfg = load_config(["batch=2"])
    workload = ExperimentWorkload(
        "finetune_vit_tiny_synthetic",
        tiny_overrides=[
            *TINY_VIT,
            "data.img_size=32",
            "task.num_classes=10",
            "task.mixup=null",
            "model.backbone.drop_path_rate=0",
        ],
    )
    module, _ = workload.build(cfg, "cpu", tiny=True)
    batch = (torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    set_fused_attn(module, True)
    counted = train_flops_per_image(module, lambda: quiet_step(module, batch, 0), 2, "counter")
    assert all(m.fused_attn for m in module.modules() if hasattr(m, "fused_attn"))  # restored
    linear_only = train_flops_per_image(module, lambda: quiet_step(module, batch, 0), 2, "analytic")
    tokens, dim = 1 + 16, 32
    attention = 6 * 2 * tokens * tokens * dim  # q@k^T and attn@v, forward + backward, one block, per image
    patch_input_grad = 2 * 16 * dim * 3 * 8 * 8  # never computed: the images need no gradient
    assert counted == pytest.approx(linear_only + attention - patch_input_grad, rel=1e-3)


def test_overhead_mode_prints_a_row_per_configuration(tmp_path, capsys):
    """``overhead=true`` runs every configuration (plain loop, bare Trainer, logger, each callback, all) and prints
    them; the figures are not judged here (never timed unit tests)."""
    out = tmp_path / "overhead.json"
    payload = run(
        [
            "overhead=true",
            "device=cpu",
            "overhead_rounds=1",
            "overhead_warmup=1",
            "overhead_steps=2",
            "overhead_batch=2",
            f"out={out}",
        ]
    )
    rows = payload["overhead"]["rows"]
    names = [r["configuration"] for r in rows]
    assert names[:3] == ["plain loop", "Trainer, no callbacks, no logger", "Trainer + csv logger"]
    callbacks = list(OmegaConf.load(Path(CONFIG_DIR) / "callbacks" / "pretrain.yaml"))  # every one is measured
    assert len(callbacks) >= 8
    assert {f"+ {c}" for c in callbacks} <= set(names) and names[-1] == "+ all (as mimlab-train runs)"
    assert all(r["ms_step"] > 0 for r in rows) and all("minus_plain" in r for r in rows[1:])
    printed = capsys.readouterr().out
    assert all(name in printed for name in names) and "minus plain loop" in printed
    assert json.loads(out.read_text())["overhead"]["rows"] == rows
