"""Every experiment in conf/experiment composes; the *_synthetic ones run a real step (and write a checkpoint that
loads weights-only), the others are instantiated on the meta device (model), with their DataModule and Trainer, so a
broken recipe cannot land."""

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from conftest import compose_config
from mimlab.train import CONFIG_DIR, build
from mimlab.utils.config_keys import unknown_key_messages

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


@pytest.fixture(scope="session")
def generated_data_dir(tmp_path_factory) -> Path:
    """``paths.data_dir`` for the dense recipes: their COCO/ADE sets are generated there on first use."""
    return tmp_path_factory.mktemp("data")


@pytest.mark.parametrize("experiment", SMALL)
def test_small_experiment_runs_a_step(experiment, tmp_path, synthetic_root, generated_data_dir):
    dense = experiment.startswith(("detect", "segment"))
    data = f"paths.data_dir={generated_data_dir}" if dense else f"data.root={synthetic_root}"
    cfg = compose_config(
        [
            f"experiment={experiment}",
            data,
            "data.batch_size=4",
            "hardware.num_workers=0",
            "logger=csv",
            "trainer.fast_dev_run=1",
            "~callbacks.progress",
        ],
        tmp_path,
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    trainer.save_checkpoint(tmp_path / "step.ckpt")  # every recipe's checkpoint loads without running code
    assert torch.load(tmp_path / "step.ckpt", weights_only=True)["global_step"] == 1


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigCompositionException, match="masking.ratoi"):
        compose_config(["masking.ratoi=0.5"], tmp_path)


def test_unknown_group_option_lists_the_choices(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"(?s)vit_gigantic.*vit_base_p16"):
        compose_config(["model/backbone=vit_gigantic"], tmp_path)


@pytest.mark.parametrize(
    "task, slots",
    [
        ("pretrain", {"model", "target", "masking", "loss", "optim", "callbacks"}),
        ("finetune", {"model", "optim", "callbacks"}),
        ("detect", {"model", "optim", "callbacks"}),
    ],
)
def test_a_task_has_only_the_slots_it_uses(task, slots, tmp_path):
    cfg = compose_config([f"task={task}"], tmp_path)
    task_slots = {"model", "target", "masking", "loss", "optim", "callbacks"}
    assert {k for k in cfg if k in task_slots} == slots
    assert ("decoder" in cfg.model) == (task == "pretrain") and ("neck" in cfg.model) == (task != "finetune")


@pytest.mark.parametrize(
    "override, slot",
    [
        ("masking.ratio=0.5", "masking"),
        ("masking=block", "masking"),
        ("model.decoder.depth=2", "model/decoder"),
        ("loss=img2vec", "loss"),
    ],
)
def test_an_override_of_a_slot_the_task_does_not_use_is_rejected_with_a_message(override, slot):
    messages = unknown_key_messages(CONFIG_DIR, "train", ["experiment=detect_mae_vit_tiny_synthetic", override])
    assert messages == [
        f"'{override}': task=detect has no '{slot}' slot; only task=pretrain use it (their "
        "conf/task/<task>.yaml defaults list adds it). Drop the override, or choose a task that uses "
        "the slot."
    ]
    assert unknown_key_messages(CONFIG_DIR, "train", ["experiment=mae_vit_tiny_synthetic", override]) == []


def test_detection_optimiser_knobs_live_in_the_optim_group(tmp_path):
    assert (
        unknown_key_messages(
            CONFIG_DIR,
            "train",
            [
                "experiment=detect_mae_vit_b_coco",
                "optim.lr=2e-4",
                "optim.param_groups.layer_decay=0.8",
                "optim.schedule.warmup_steps=100",
            ],
        )
        == []
    )
    (message,) = unknown_key_messages(CONFIG_DIR, "train", ["experiment=detect_mae_vit_b_coco", "task.lr=2e-4"])
    assert message.startswith("unknown config key 'task.lr'")
    cfg = compose_config(
        [
            "experiment=segment_itpn_b_ade",
            "logger=csv",
            "optim.lr=2e-4",
            "optim.param_groups.layer_decay=0.8",
            "optim.schedule.warmup_steps=100",
        ],
        tmp_path,
    )
    with torch.device("meta"):
        module = instantiate(cfg.task)
    assert (module.optim.lr, module.optim.param_groups.layer_decay) == (2e-4, 0.8)
    schedule = module.optim.schedule(
        steps_per_epoch=1000, epochs=1, warmup_epochs=module.optim.warmup_epochs, min_lr_ratio=0.0
    )
    assert schedule(50) == pytest.approx(0.5 * (1 - 50 / 1000), rel=1e-5)  # warm-up x poly


@pytest.mark.parametrize("experiment", ["mae_vit_tiny_synthetic", "finetune_vit_tiny_synthetic"])
def test_debug_quiet_builds_no_drawing_probing_or_timing_callback(experiment, tmp_path):
    """``debug=quiet`` (conf/debug/): the callbacks it sets to null are not built; checkpoints and lr logging stay."""
    names = {}
    for debug in ([], ["debug=quiet"]):
        cfg = compose_config([f"experiment={experiment}", "logger=csv", "data.root=/never/read", *debug], tmp_path)
        _, _, trainer = build(cfg)
        names[bool(debug)] = {type(c).__name__ for c in trainer.callbacks}
    assert {"RunCheckpoint", "LearningRateMonitor", "NonFiniteGuard"} <= names[True]
    assert {"WallClockThroughput", "ProgressBar"} <= names[False] - names[True]
    assert not {"KNNMonitor", "ReconstructionPanel", "TrainingDashboard", "TeacherTargetPanel"} & names[True]
