"""SimMIM and MaskFeat through the real composition: every parameter gets a gradient (DDP runs with a static graph and
``find_unused_parameters=False``), the mask-token encoders train on the synthetic images (val loss falls) and the
checkpoint holds the encoder with its mask token under ``backbone.``."""

import pytest
import torch
from hydra.utils import instantiate

from conftest import SMALL_VIT, compose_config
from mimlab.train import build, run

TINY_SWIN = [
    "data.img_size=64",
    "model.backbone.embed_dim=16",
    "model.backbone.depths=[1,1,1,1]",
    "model.backbone.num_heads=[1,2,2,4]",
    "model.backbone.window_size=2",
]


COMPOSITIONS = [("simmim_vit_tiny_synthetic", []), ("maskfeat_vit_tiny_synthetic", []), ("simmim_swin_b", TINY_SWIN)]


def _step_loss(experiment, extra, tmp_path) -> tuple[torch.nn.Module, torch.Tensor]:
    cfg = compose_config([f"experiment={experiment}", "logger=csv", *extra], tmp_path)
    module = instantiate(cfg.task)
    size = cfg.data.img_size
    return module, module.compute_losses(torch.randn(2, 3, size, size))["loss"]


@pytest.mark.parametrize("experiment,extra", COMPOSITIONS)
def test_every_parameter_gets_a_gradient(experiment, extra, tmp_path):
    module, loss = _step_loss(experiment, extra, tmp_path)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


@pytest.mark.parametrize("experiment,extra", COMPOSITIONS)
def test_a_step_runs_under_bf16_autocast(experiment, extra, tmp_path):
    """hardware=gpu trains under bf16 autocast: relative bias, HOG target and losses must keep their dtypes apart."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = _step_loss(experiment, extra, tmp_path)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


SMALL = [
    "data.img_size=32",
    "data.batch_size=8",
    "hardware.num_workers=0",
    *SMALL_VIT,
    "optim.warmup_epochs=1",
    "optim.blr=5e-3",
    "logger=csv",
    "~callbacks.progress",
    "~callbacks.knn",
    "trainer.max_epochs=8",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,extra",
    [
        ("simmim_vit_tiny_synthetic", []),  # 2x2 units of 16 px, 3 masked
        ("maskfeat_vit_tiny_synthetic", ["masking.min_num_patches=1"]),  # 4x4 patches, 6 masked
    ],
)
def test_tiny_mask_token_pretraining_lowers_the_loss(experiment, extra, tmp_path, synthetic_root):
    overrides = [f"experiment={experiment}", *SMALL, *extra, f"data.root={synthetic_root}"]
    cfg = compose_config(overrides, tmp_path)
    datamodule, module, trainer = build(compose_config(overrides, tmp_path / "untrained"))  # a run folder of its own
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    result = run(cfg)
    after = result["metrics"]["val/loss"]
    assert after < 0.9 * before, (before, after)
    state = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert "backbone.mask_token" in state and any(k.startswith("backbone.blocks.1.") for k in state)
