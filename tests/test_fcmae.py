"""FCMAE composition (docs/methods.md §3.3, §7 rows 24–28): configs, mask counts, shapes, loss going down."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mimlab.losses import MaskedMSE
from mimlab.masking import RandomMasking
from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2
from mimlab.models.heads.fcmae_decoder import FCMAEDecoder
from mimlab.targets.pixels import NormPixTarget

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SIZES = {
    "atto": ([2, 2, 6, 2], [40, 80, 160, 320]),
    "femto": ([2, 2, 6, 2], [48, 96, 192, 384]),
    "pico": ([2, 2, 6, 2], [64, 128, 256, 512]),
    "nano": ([2, 2, 8, 2], [80, 160, 320, 640]),
    "tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
    "huge": ([3, 3, 27, 3], [352, 704, 1408, 2816]),
}


def composed(experiment):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose("train", overrides=[f"experiment={experiment}"])


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_base_recipe_matches_row_28_and_model_rows_25_27():
    cfg = composed("fcmae_convnextv2_base")
    assert (cfg.masking.ratio, cfg.masking.unit_size, cfg.target.norm_pix) == (0.6, 32, True)
    assert (cfg.optim.blr, list(cfg.optim.optimizer.betas), cfg.optim.weight_decay) == (1.5e-4, [0.9, 0.95], 0.05)
    assert (cfg.optim.warmup_epochs, cfg.trainer.max_epochs, cfg.data.img_size) == (40, 1600, 224)
    assert cfg.data.batch_size * 64 == 4096  # 64 per GPU x 64 GPUs (or accumulate on fewer)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    assert round(count(module.backbone) / 1e6, 3) == 87.691 and round(count(module.decoder) / 1e6, 3) == 4.232
    assert (len(module.decoder.decoder), module.decoder.proj.out_channels, module.decoder.pred.out_channels) == (
        1,
        512,
        3072,
    )


def test_every_size_has_an_experiment_with_the_same_recipe():
    for size, (depths, dims) in SIZES.items():  # docs/methods.md §3.1
        cfg = composed(f"fcmae_convnextv2_{size}")
        assert (list(cfg.model.backbone.depths), list(cfg.model.backbone.dims)) == (depths, dims), size
        assert (cfg.masking.ratio, cfg.masking.unit_size, cfg.optim.blr, cfg.trainer.max_epochs) == (
            0.6,
            32,
            1.5e-4,
            1600,
        )
        assert (cfg.model.decoder.embed_dim, cfg.model.decoder.depth) == (512, 1)
        with torch.device("meta"):
            decoder = instantiate(cfg.task).decoder  # built from the backbone: its input is the last stage's width
        assert decoder.proj.in_channels == dims[3], size


def test_atto_at_224_masks_30_of_49_units_and_predicts_3072_values_each():
    cfg = composed("fcmae_convnextv2_atto")
    with torch.device("meta"):
        module = instantiate(cfg.task)
    assert round(count(module.backbone) / 1e6, 3) == 3.387 and round(count(module.decoder) / 1e6, 3) == 3.871
    mask = module.masking(4, module.masking.grid((224, 224)), generator=torch.Generator().manual_seed(0))
    assert mask.shape == (4, 49) and mask.sum(1).tolist() == [30.0] * 4
    with torch.device("meta"):
        pred = module.decoder(module.backbone(torch.empty(4, 3, 224, 224), mask.to("meta")), mask.to("meta"))
    assert pred.shape == (4, 49, 3072)


@pytest.fixture
def one_thread():
    """Train on one intra-op thread: on this shared 2-core machine the 2-thread pool that conftest sets spins under
    load (these 25 steps took 90 s with 2 threads vs 2 s with 1 at load average 14)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_fcmae_lowers_the_norm_pix_loss(one_thread):
    torch.manual_seed(0)
    encoder = MaskedConvNeXtV2((1, 1, 1, 1), (16, 32, 48, 64))
    decoder = FCMAEDecoder(64, embed_dim=64, patch_size=32)
    target, loss_fn, masking = NormPixTarget(patch_size=32), MaskedMSE(), RandomMasking(ratio=0.6, unit_size=32)
    images = torch.randn(4, 3, 64, 64).cumsum(-1).cumsum(-2) / 16  # smooth images: predictable from context
    params = [*encoder.parameters(), *decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for step in range(25):
        mask = masking(4, masking.grid((64, 64)), generator=torch.Generator().manual_seed(step))
        loss = loss_fn(decoder(encoder(images, mask), mask), target(images, mask), mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
