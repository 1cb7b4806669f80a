"""The hardware group: every option composes with the same keys, the fast-path switches act, SLURM wiring, lr scaling."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY_MAE_DECODER, TINY_VIT, compose_config
from mimlab.optim import OptimizerFactory
from mimlab.train import CONFIG_DIR
from mimlab.utils.ddp import MimDDPStrategy
from mimlab.utils.fast_paths import apply_fast_paths, set_fused_attn

KEYS = {
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "plugins",
    "precision",
    "compile",
    "compile_mode",
    "fused_optimizer",
    "fused_attn",
    "channels_last",
    "matmul_precision",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "prefetch_factor",
}


@pytest.mark.parametrize("option", ["cpu", "gpu", "ddp"])
def test_every_option_has_the_same_keys(option):
    cfg = compose_config([f"hardware={option}"])
    assert KEYS <= set(cfg.hardware)


def test_slurm_wires_submitit_requeue_and_resume():
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "paths.output_dir=/tmp/x",
                "experiment=mae_vit_b",
                "hardware=slurm",
                "hardware.num_nodes=4",
                "hardware.devices=8",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (4, 8, 8)
    assert launcher.max_num_timeout > 0 and launcher.additional_parameters.requeue
    assert "now" not in OmegaConf.to_container(cfg.hydra.sweep)["dir"]  # requeued jobs find their checkpoints
    assert cfg.ckpt_path == "last" and cfg.trainer.num_nodes == 4
    plugins = instantiate(cfg.hardware.plugins)
    assert type(plugins[0]).__name__ == "SLURMEnvironment" and plugins[0].auto_requeue is False
    strategy = instantiate(cfg.hardware.strategy)
    assert isinstance(strategy, MimDDPStrategy) and strategy.static_graph


def test_ddp_static_graph_follows_the_trainers_accumulation():
    assert instantiate(compose_config(["hardware=ddp"]).hardware.strategy).static_graph
    with pytest.warns(UserWarning, match="static_graph=true is switched off because trainer.accumulate_grad_batches=4"):
        strategy = instantiate(compose_config(["hardware=ddp", "trainer.accumulate_grad_batches=4"]).hardware.strategy)
    assert not strategy.static_graph
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=1 but the Trainer accumulates 2 batches"):
        MimDDPStrategy(static_graph=True).setup(SimpleNamespace(accumulate_grad_batches=2))  # built outside Hydra


def test_fast_path_switches_act_on_the_module():
    from timm.models.vision_transformer import Block

    module = nn.Sequential(nn.Conv2d(3, 8, 3), Block(8, 2))
    assert set_fused_attn(module, False) == 1 and module[1].attn.fused_attn is False
    hw = OmegaConf.create({"fused_attn": True, "channels_last": True, "compile": True, "compile_mode": None})
    out = apply_fast_paths(module, hw)
    assert module[1].attn.fused_attn is True
    assert module[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(out, torch._dynamo.eval_frame.OptimizedModule) and out._orig_mod is module
    assert apply_fast_paths(module, OmegaConf.create({"compile": False})) is module


def test_lr_scaling_counts_devices_nodes_and_accumulation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            accelerator="cpu", devices=2, num_nodes=3, strategy="ddp", accumulate_grad_batches=4, logger=False
        )
    assert OptimizerFactory.effective_batch(trainer, 64) == 64 * 2 * 3 * 4
    factory = OptimizerFactory(torch.optim.AdamW, blr=1.5e-4)
    assert factory.absolute_lr(trainer, 64) == pytest.approx(1.5e-4 * 1536 / 256)


class _StartStep(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


def test_ckpt_path_last_resumes_a_requeued_run(synthetic_root, tmp_path):
    """The SLURM resume path: a second launch into the same run folder continues from checkpoints/last.ckpt."""
    from mimlab.checkpoints.auto_resume import resolve_ckpt_path
    from mimlab.train import build

    assert resolve_ckpt_path("last", tmp_path) is None  # first launch: start fresh

    overrides = [
        "experiment=mae_vit_tiny_synthetic",
        "logger=none",
        f"data.root={synthetic_root}",
        "data.img_size=32",
        "data.batch_size=4",
        "hardware.num_workers=0",
        *TINY_VIT,
        *TINY_MAE_DECODER,
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "~callbacks.progress",
        "~callbacks.reconstruction",
        "~callbacks.throughput",
        "~callbacks.lr_monitor",
        "ckpt_path=last",
    ]
    steps = []
    for epochs in (1, 2):  # the second launch extends the run: its lr schedule changes on purpose
        cfg = compose_config([*overrides, f"trainer.max_epochs={epochs}", "allow_schedule_change=true"], tmp_path)
        datamodule, module, trainer = build(cfg)
        probe = _StartStep()
        trainer.callbacks.append(probe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, tmp_path))
        steps.append((probe.step, trainer.global_step))
    assert steps == [(0, 2), (2, 4)]
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("/x/y.ckpt", tmp_path) == "/x/y.ckpt"


@pytest.mark.parametrize(
    "gpus, devices, message",
    [
        (0, -1, "hardware.accelerator=gpu asks for GPUs, but this machine has no CUDA GPU"),
        (
            1,
            2,
            "hardware.devices=2 asks for 2 GPUs, but this machine has 1. Set hardware.devices=1 (or -1 for all of them)",
        ),
        (2, "[0,3]", "hardware.devices=[0, 3] asks for 4 GPUs, but this machine has 2."),
    ],
)
def test_ddp_asking_for_more_gpus_than_there_are_is_named_before_the_trainer(monkeypatch, gpus, devices, message):
    from mimlab.train import build

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    cfg = compose_config(["experiment=mae_vit_tiny_synthetic", "hardware=ddp", f"hardware.devices={devices}"])
    with pytest.raises(ValueError) as err:
        build(cfg)
    assert message in str(err.value)


def test_gpu_requests_within_the_machine_pass(monkeypatch):
    from mimlab.utils.devices import check_devices, requested_gpus

    assert [requested_gpus(d, 4) for d in (-1, "auto", 2, "3", "0,3", [0, 1])] == [4, 4, 2, 3, 4, 2]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for devices in (-1, 4, "0,3"):
        check_devices(OmegaConf.create({"accelerator": "gpu", "devices": devices}))
    check_devices(OmegaConf.create({"accelerator": "cpu", "devices": 64}))  # CPU devices are processes: not counted
