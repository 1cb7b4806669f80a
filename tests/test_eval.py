"""``mimlab-eval``: a checkpoint validated as its task reproduces the figures its run logged for those weights; the
representation check measures a checkpoint and its export identically, against random init; bad input is named.
(Two-process evaluation equal to one process, and the dense tasks: tests/test_ddp.py.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_MAE, TINY_VIT, compose_config
from mimlab.checkpoints.export import export
from mimlab.eval import main
from mimlab.evaluation.representation import LabelledFeatures, knn_accuracy, linear_probe_accuracy
from mimlab.train import build


def fit(overrides: list[str], out: Path) -> Path:
    cfg = compose_config([*overrides, "+trainer.num_sanity_val_steps=0"], out)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return out / "checkpoints" / "last.ckpt"


def last_logged(run: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    with open(run / "csv" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            values.update({k: float(v) for k, v in row.items() if v and k.startswith(("val/", "knn/"))})
    return values


@pytest.fixture(scope="module")
def mae_checkpoint(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mae")
    return fit(
        [
            *TINY_MAE,
            *(f"~callbacks.{name}" for name in ("progress", "reconstruction", "dashboard", "throughput")),
            "model.decoder.embed_dim=16",
            "model.decoder.num_heads=2",
            f"data.root={synthetic_root}",
            "data.batch_size=20",
            "trainer.max_epochs=2",
            "callbacks.knn.every_n_epochs=1",
        ],
        out,
    )


def test_a_pretraining_checkpoint_validates_to_the_figures_its_run_logged(mae_checkpoint, tmp_path, capsys):
    out = tmp_path / "0_experiment=mae,seed=0"  # a sweep job's folder name: '=' and ',' in the path
    main([f"ckpt={mae_checkpoint}", f"out={out}"])
    record = json.loads((out / "metrics.json").read_text())
    logged = last_logged(mae_checkpoint.parent.parent)
    assert record["task"] == "MaskedPretraining" and record["step"] == 6 and record["processes"] == 1
    assert set(record["metrics"]) == {"val/loss", "knn/acc1"}
    assert record["metrics"] == {k: logged[k] for k in record["metrics"]}
    assert "val/loss" in capsys.readouterr().out


def test_a_linear_probe_checkpoint_validates_to_the_figures_its_run_logged(mae_checkpoint, synthetic_root, tmp_path):
    probe = fit(
        [
            "experiment=linprobe_vit_tiny_synthetic",
            f"data.root={synthetic_root}",
            f"task.pretrained={mae_checkpoint}",
            "data.img_size=32",
            *TINY_VIT,
            "data.batch_size=20",
            "trainer.max_epochs=1",
            "hardware.num_workers=0",
            "logger=csv",
            "~callbacks.progress",
            "~callbacks.throughput",
        ],
        tmp_path / "probe",
    )
    main([f"ckpt={probe}", f"out={tmp_path / 'eval'}", "data.batch_size=7"])  # another batch size: same figures
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    logged = last_logged(probe.parent.parent)
    assert {"val/acc1", "val/acc5", "val/loss"} <= set(metrics)
    assert metrics["val/acc1"] == logged["val/acc1"] and metrics["val/acc5"] == logged["val/acc5"]


def test_the_representation_check_measures_a_checkpoint_and_its_export_alike(mae_checkpoint, synthetic_root, tmp_path):
    options = ["img_size=32", "probe_epochs=20", f"features={synthetic_root}"]
    main([f"ckpt={mae_checkpoint}", f"out={tmp_path / 'ckpt.json'}", *options])
    exported = export(mae_checkpoint, tmp_path / "encoder.pth")
    main([f"ckpt={exported.path}", f"out={tmp_path / 'export.json'}", *options])
    ours, theirs = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("ckpt", "export"))
    assert ours["readout"] == "avg" and ours["format"] == "mimlab" and theirs["format"] == "export"
    assert theirs["encoder"] == exported.spec["model_name"]
    assert ours["results"]["trained"] == theirs["results"]["trained"]  # the export computes the same features
    for record in (ours, theirs):
        assert set(record["results"]) == {"trained", "random init"}
        for result in record["results"].values():
            assert result["train_images"] == 60 and result["val_images"] == 20
            assert 0 <= result["knn_top1"] <= 100 and 0 <= result["probe_top1"] <= 100
    assert ours["results"]["random init"] != ours["results"]["trained"]


def test_the_linear_probe_separates_separable_features_and_not_random_labels():
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(5, 16, generator=generator)

    def split(n: int, shuffled: bool) -> LabelledFeatures:
        labels = torch.arange(n) % 5
        features = centres[labels] + torch.randn(n, 16, generator=generator)
        return LabelledFeatures(features, labels[torch.randperm(n, generator=generator)] if shuffled else labels)

    assert linear_probe_accuracy(split(400, False), split(100, False), epochs=30) > 95
    assert linear_probe_accuracy(split(400, True), split(100, True), epochs=30) < 45
    assert knn_accuracy(split(400, False), split(100, False)) > 95


def test_bad_input_is_named(mae_checkpoint, synthetic_root, tmp_path):
    with pytest.raises(SystemExit, match="it is a folder"):
        main([f"ckpt={mae_checkpoint.parent}"])
    with pytest.raises(SystemExit, match="unknown config key 'data.rooot'"):
        main([f"ckpt={mae_checkpoint}", "data.rooot=/x", f"out={tmp_path}"])
    with pytest.raises(SystemExit, match="unknown option"):
        main([f"ckpt={mae_checkpoint}", f"features={synthetic_root}", "knn=5"])
    bare = tmp_path / "weights.pth"
    torch.save({"model": torch.load(mae_checkpoint, weights_only=False)["state_dict"]}, bare)
    with pytest.raises(SystemExit, match="carries no mimlab config.*features="):
        main([f"ckpt={bare}", f"out={tmp_path}"])


def test_feature_statistics_tell_collapse_from_spread():
    from mimlab.evaluation.representation import feature_statistics

    generator = torch.Generator().manual_seed(0)
    spread = feature_statistics(torch.randn(500, 32, generator=generator))
    collapsed = feature_statistics(torch.ones(500, 32) + 1e-3 * torch.randn(500, 32, generator=generator))
    assert spread["effective_rank"] > 28 and abs(spread["mean_cosine"]) < 0.01
    assert collapsed["effective_rank"] < 2 and collapsed["mean_cosine"] > 0.99
