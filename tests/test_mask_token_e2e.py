"""SimMIM and MaskFeat through the real composition on the synthetic images: the mask-token encoders train (val loss
falls) and the checkpoint holds the encoder with its mask token under ``backbone.``."""
import pytest
import torch

from conftest import compose_config
from mimlab.train import build, run

SMALL = ["data.img_size=32", "data.batch_size=8", "hardware.num_workers=0", "model.backbone.embed_dim=64",
         "model.backbone.depth=2", "model.backbone.num_heads=2", "optim.warmup_epochs=1", "optim.blr=5e-3",
         "logger=csv", "~callbacks.progress", "~callbacks.knn", "trainer.max_epochs=8"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment,extra", [
    ("simmim_vit_tiny_synthetic", []),                                       # 2x2 units of 16 px, 3 masked
    ("maskfeat_vit_tiny_synthetic", ["masking.min_num_patches=1"]),          # 4x4 patches, 6 masked
])
def test_tiny_mask_token_pretraining_lowers_the_loss(experiment, extra, tmp_path, synthetic_root):
    cfg = compose_config([f"experiment={experiment}", *SMALL, *extra, f"data.root={synthetic_root}"], tmp_path)
    datamodule, module, trainer = build(cfg)
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    result = run(cfg)
    after = result["metrics"]["val/loss"]
    assert after < 0.9 * before, (before, after)
    state = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert "backbone.mask_token" in state and any(k.startswith("backbone.blocks.1.") for k in state)
