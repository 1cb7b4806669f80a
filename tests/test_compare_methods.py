"""The method-comparison protocol (conf/sweep/compare_methods.yaml + experiments/compare_methods): every job of the
sweep composes with the shared settings, and each method's encoder, rebuilt by the transfer step from the job's saved
config, takes that job's pre-trained encoder weights through the loader the transfer runs use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mimlab.train import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare", ROOT / "experiments" / "compare_methods" / "compare.py")
compare = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
spec.loader.exec_module(compare)  # type: ignore[union-attr]


def sweep_params() -> dict[str, str]:
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["+sweep=compare_methods"], return_hydra_config=True)
    return {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}


PARAMS = sweep_params()
EXPERIMENTS = PARAMS.pop("experiment").split(",")
SEEDS = PARAMS.pop("seed").split(",")
DATA = PARAMS.pop("data")


def test_the_sweep_covers_the_eight_methods_over_three_seeds_on_a_photo_folder():
    protocol = OmegaConf.load(ROOT / "experiments" / "compare_methods" / "transfer.yaml")
    assert len(EXPERIMENTS) == 8 and set(EXPERIMENTS) == set(protocol.recipes)
    assert len(set(SEEDS)) == 3 and DATA == "imagenet"


def test_rows_are_grouped_by_method_with_mean_and_std_over_seeds(tmp_path):
    rows = [
        {"method": "mae", "seed": s, "metrics": {"knn": k, "knn_random": r, "probe": p, "probe_random": 30.0}}
        for s, k, r, p in ((0, 40.0, 30.0, 50.0), (1, 42.0, 31.0, 52.0), (2, 44.0, 29.0, 54.0))
    ] + [{"method": "simmim", "seed": 0, "metrics": {"knn": 35.0, "knn_random": 30.0, "probe": 45.0}}]
    groups = compare.by_method(rows)
    assert [g["method"] for g in groups] == ["mae", "simmim"] and groups[0]["seeds"] == [0, 1, 2]
    assert groups[0]["mean"]["knn"] == pytest.approx(42.0) and groups[0]["std"]["knn"] == pytest.approx(2.0)
    table = compare.write_table(groups, tmp_path)
    assert "| mae | 3 | 42.0 ± 2.0 |" in table.replace("  ", " ") or "42.0 ± 2.0" in table
    assert (tmp_path / "acc1_vs_method.png").stat().st_size > 0 and (tmp_path / "results.csv").exists()


def test_runs_of_different_lengths_are_never_averaged(tmp_path):
    rows = [
        {"method": "ijepa", "seed": s, "steps": n, "metrics": {"knn": k, "knn_random": 28.0, "probe": 40.0}}
        for s, n, k in ((0, 700, 29.0), (0, 2100, 35.0), (1, 2100, 37.0))
    ] + [{"method": "mae", "seed": 0, "steps": 700, "metrics": {"knn": 40.0, "knn_random": 30.0, "probe": 50.0}}]
    groups = compare.by_method(rows)
    assert [g["method"] for g in groups] == ["ijepa (700 steps)", "ijepa (2,100 steps)", "mae"]
    assert groups[1]["seeds"] == [0, 1] and groups[1]["mean"]["knn"] == pytest.approx(36.0)
    assert "ijepa (2,100 steps)" in compare.write_table(groups, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_job_composes_under_the_protocol_and_its_encoder_transfers(experiment, tmp_path):
    job = tmp_path / f"0_experiment={experiment}"
    shared = [f"data={DATA}", f"seed={SEEDS[0]}", *(f"{k}={v}" for k, v in PARAMS.items())]
    overrides = [f"experiment={experiment}", *shared, f"paths.output_dir='{job}'"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    for key, value in PARAMS.items():  # the shared settings win over the recipe's own
        assert str(OmegaConf.select(cfg, key)) == value, key
    assert cfg.data._target_ == "mimlab.data.imagenet.ImageNetDataModule"
    (job / ".hydra").mkdir(parents=True)  # the two files Hydra saves in a job folder
    OmegaConf.save({"hydra": cfg.hydra}, job / ".hydra" / "hydra.yaml")
    del cfg.hydra
    OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    trained = instantiate(cfg.model.backbone)
    checkpoint = job / "last.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in trained.state_dict().items()}}, checkpoint)

    protocol = OmegaConf.load(ROOT / "experiments" / "compare_methods" / "transfer.yaml")
    recipes, shared_overrides = protocol.recipes[experiment], list(protocol.overrides)
    for kind in compare.TRANSFERS:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            transfer = compose(
                "train", overrides=[f"experiment={recipes[kind]}", *compare.encoder_overrides(job), *shared_overrides]
            )
        module = instantiate(transfer.task, pretrained=str(checkpoint))  # raises on any key or shape mismatch
        shared = [n for n in module.backbone.state_dict() if n in trained.state_dict()]
        assert len(shared) >= len(trained.state_dict()) - 2, kind  # all but the final norm (dropped by fine-tuning)
        for name in shared:
            assert module.backbone.state_dict()[name].equal(trained.state_dict()[name]), (experiment, kind, name)
