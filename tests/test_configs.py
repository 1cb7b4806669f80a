"""Every experiment in conf/experiment composes; the *_synthetic ones run a real step, the others are instantiated
on the meta device (model), with their DataModule and Trainer, so a broken recipe cannot land."""
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from conftest import compose_config
from mimlab.train import CONFIG_DIR, build

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
SMALL = [e for e in EXPERIMENTS if e.endswith("_synthetic")]
PAPER = [e for e in EXPERIMENTS if not e.endswith("_synthetic")]


def test_there_are_experiments_of_both_kinds():
    assert "mae_vit_tiny_synthetic" in SMALL and {"mae_vit_b", "mae_vit_l", "mae_vit_h"} <= set(PAPER)


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_scale_experiment_instantiates(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", "logger=csv"], tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    assert sum(p.numel() for p in module.parameters()) > 1e6
    instantiate(cfg.data)
    instantiate(cfg.trainer)


@pytest.mark.parametrize("experiment", SMALL)
def test_small_experiment_runs_a_step(experiment, tmp_path, synthetic_root):
    cfg = compose_config([
        f"experiment={experiment}", f"data.root={synthetic_root}", "data.batch_size=4", "hardware.num_workers=0",
        "logger=csv", "trainer.fast_dev_run=1", "~callbacks.progress",
    ], tmp_path)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("hardware", ["cpu", "gpu", "ddp"])
def test_hardware_groups_compose(hardware, tmp_path):
    cfg = compose_config([f"hardware={hardware}"], tmp_path)
    assert cfg.trainer.precision == cfg.hardware.precision
    if hardware == "ddp":
        strategy = instantiate(cfg.hardware.strategy)
        assert strategy.static_graph and strategy.accumulate_grad_batches == cfg.trainer.accumulate_grad_batches
        assert cfg.hardware.precision == "bf16-mixed" and cfg.hardware.compile


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigCompositionException, match="masking.ratoi"):
        compose_config(["masking.ratoi=0.5"], tmp_path)


def test_unknown_group_option_lists_the_choices(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"(?s)vit_gigantic.*vit_base_p16"):
        compose_config(["model/backbone=vit_gigantic"], tmp_path)
