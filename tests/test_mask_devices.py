"""Pre-training keeps masks on the host: backbones read the visible count there (no device sync, no graph break on a
device tensor) and move the mask to the images' device themselves. Images on the meta device stand in for a GPU:
any op that mixes the host mask with device tensors fails exactly as it would on CUDA."""

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from mimlab.masking import RandomMasking
from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2
from mimlab.models.backbones.hivit import HiViT
from mimlab.models.backbones.vit import MaskedViT

META = torch.device("meta")


def host_mask(grid, ratio=0.75, unit=16):
    return RandomMasking(ratio, unit)(2, grid, torch.Generator().manual_seed(0))


def test_vit_moves_a_host_mask_to_the_image_device():
    with META:
        vit = MaskedViT(64, 16, 3, 32, 1, 2)
    enc = vit(torch.empty(2, 3, 64, 64, device=META), host_mask((4, 4)))
    assert enc.tokens.device.type == "meta" and enc.tokens.shape == (2, 1 + 4, 32)
    assert enc.mask.device.type == "meta" and enc.ids_restore.device.type == "meta"


@pytest.mark.parametrize("drop_masked", [True, False])
def test_hivit_moves_a_host_mask_to_the_image_device(drop_masked):
    with META:
        hivit = HiViT(embed_dim=64, mlp_depth=1, depth=1, num_heads=2, img_size=64, drop_masked=drop_masked)
    enc = hivit(torch.empty(2, 3, 64, 64, device=META), host_mask((4, 4)))
    assert enc.mask.device.type == "meta"


def test_convnextv2_moves_a_host_mask_to_the_image_device():
    with META:
        net = MaskedConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    out = net(torch.empty(2, 3, 64, 64, device=META), host_mask((2, 2), 0.5, 32)).map
    assert out.device.type == "meta" and out.shape == (2, 64, 2, 2)


def test_pretraining_draws_masks_on_the_host(tmp_path):
    module = instantiate(compose_config(["experiment=mae_vit_tiny_synthetic", "data.img_size=32"], tmp_path).task)
    masks = module.make_mask(torch.zeros(2, 3, 32, 32), 0)
    assert masks.mask.device.type == "cpu" and masks.mask.shape == (2, 16)
    assert masks.visible == 4  # MAE's 75 % of 16 units masked, stated by the generator


SYNTHETIC = sorted(
    p.stem
    for p in __import__("pathlib")
    .Path(__file__)
    .resolve()
    .parents[1]
    .joinpath("conf", "experiment")
    .glob("*_synthetic.yaml")
    if not p.stem.startswith(("finetune", "linprobe", "detect", "segment"))
)


@pytest.mark.parametrize("experiment", SYNTHETIC)
def test_every_pretraining_composition_runs_with_images_on_another_device(experiment, tmp_path):
    """The whole masking -> backbone -> neck -> decoder -> target -> loss chain with images on the meta device and the
    mask drawn on the host: every part must agree on devices as it would on a GPU."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    with META:
        module = instantiate(cfg.task)
    size = cfg.data.img_size
    losses = module.compute_losses(torch.empty(2, 3, size, size, device=META))
    assert losses["loss"].device.type == "meta"


def test_dashboard_flop_count_runs_with_the_model_on_another_device(tmp_path):
    """The dashboard counts FLOPs through the module's own step (host mask moved by the module), so it works on a GPU:
    counting with a host mask handed straight to the loss failed there (cuda:0 vs cpu)."""
    from mimlab.callbacks.dashboard import measure_train_flops

    cfg = compose_config(["experiment=mae_vit_tiny_synthetic", "data.img_size=32"], tmp_path)
    with META:
        module = instantiate(cfg.task)
    assert measure_train_flops(module, torch.empty(2, 3, 32, 32, device=META)) > 0
