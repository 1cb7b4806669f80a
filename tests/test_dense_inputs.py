"""One size knob for dense transfer (data.img_size) with real backbones, and the bad-input messages."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import SMALL_VIT, compose_config
from mimlab.checkpoints import CheckpointMismatchError
from mimlab.data.ade20k import ADE20KSegmentation
from mimlab.data.coco import COCODataModule
from mimlab.data.synthetic_dense import write_ade20k, write_coco
from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2
from mimlab.models.backbones.hivit import HiViT
from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.necks.dense_adapter import DenseFeatureAdapter
from mimlab.models.necks.simple_fpn import SimpleFeaturePyramid
from mimlab.tasks.detection import MaskRCNNDetection
from mimlab.train import build


def _pretrain_checkpoint(path: Path, backbone: torch.nn.Module) -> Path:
    """A mimlab pre-training checkpoint: ``backbone.*`` weights and the backbone class in the stored config."""
    cls = type(backbone)
    config = {"model": {"backbone": {"_target_": f"{cls.__module__}.{cls.__qualname__}"}}}
    torch.save(
        {"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "mimlab": {"config": config}},
        path,
    )
    return path


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"), num_train=4, num_val=2, size=64, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("patch, pretrain_size, size", [(4, 32, 64), (16, 64, 128)])
def test_vit_checkpoint_goes_into_detection_at_another_size_with_one_knob(
    patch, pretrain_size, size, coco_root, tmp_path, caplog
):
    vit = MaskedViT(img_size=pretrain_size, patch_size=patch, embed_dim=64, depth=2, num_heads=2)
    ckpt = _pretrain_checkpoint(tmp_path / "mae.ckpt", vit)
    cfg = compose_config(
        [
            "experiment=detect_mae_vit_tiny_synthetic",
            f"model.backbone.patch_size={patch}",
            *SMALL_VIT,
            f"task.pretrained={ckpt}",
            f"data.root={coco_root}",
            f"data.img_size={size}",
            "data.batch_size=2",
            "hardware.num_workers=0",
            "logger=csv",
            "trainer.fast_dev_run=1",
            "~callbacks.progress",
        ],
        tmp_path,
    )
    with caplog.at_level("INFO"):
        datamodule, module, trainer = build(cfg)
    g0, g1 = pretrain_size // patch, size // patch
    assert f"pos_embed: resampled from the checkpoint's {g0}x{g0} grid to the model's {g1}x{g1} grid" in caplog.text
    bb = module.adapter.backbone
    torch.testing.assert_close(bb.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert bb.pos_embed.shape == (1, 1 + g1 * g1, 64) and module.model.transform.min_size == (size,)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert {"val/bbox_mAP", "val/segm_mAP"} <= set(trainer.callback_metrics)


def test_detection_evaluates_on_the_square_canvas_it_trains_on(tmp_path):
    """LSJ trains on img_size² canvases; at evaluation a landscape image, resized to img_size on its longer side, is
    padded to the same square, so the ViT sees the pos-embed grid it was trained on (padding to a multiple of the
    coarsest stride, 64, gave an 8x16 grid resampled from 16x16). The multi-scale recipes keep non-square inputs."""
    cfg = compose_config(["experiment=detect_mae_vit_tiny_synthetic", "data.img_size=128", "logger=csv"], tmp_path)
    assert cfg.task.adapter.input_size == 128
    module = instantiate(cfg.task)
    seen = []
    backbone = module.adapter.backbone
    forward_features = backbone.forward_features
    backbone.forward_features = lambda x, *a: seen.append(tuple(x.shape[-2:])) or forward_features(x, *a)
    module.eval()
    with torch.no_grad():
        out = module([torch.rand(3, 48, 96)])  # resized to 64x128 by the detector, then padded
    assert seen == [(128, 128)] and len(out) == 1
    for experiment in ("detect_convnextv2_b_coco", "detect_itpn_b_coco"):
        assert compose_config([f"experiment={experiment}", "logger=csv"], tmp_path).task.adapter.input_size is None


@pytest.mark.parametrize("patch, size", [(4, 64), (8, 64), (14, 448), (16, 128)])
def test_simple_fpn_gives_strides_4_to_32_for_any_patch(patch, size):
    vit = MaskedViT(img_size=size, patch_size=patch, embed_dim=32, depth=1, num_heads=2)
    adapter = DenseFeatureAdapter(
        vit, partial(SimpleFeaturePyramid.attach, out_channels=8), out_strides=(4, 8, 16, 32, 64), pool_name="pool"
    )
    out = adapter(torch.randn(1, 3, size, size))
    assert [tuple(y.shape[-2:]) for y in out.values()] == [(size // s, size // s) for s in (4, 8, 16, 32)] + [
        (max(1, size // 64),) * 2
    ]


def test_hivit_absolute_pos_embed_resampled_on_load(tmp_path, caplog):
    kw = dict(embed_dim=64, mlp_depth=1, depth=1, num_heads=2)
    src = HiViT(img_size=32, **kw)
    ckpt = _pretrain_checkpoint(tmp_path / "itpn.ckpt", src)
    dst = DenseFeatureAdapter(HiViT(img_size=64, **kw), out_strides=(4, 8, 16))
    with caplog.at_level("INFO"):
        dst.load_pretrained(ckpt)
    assert "absolute_pos_embed: resampled from the checkpoint's 2x2 grid to the model's 4x4 grid" in caplog.text
    torch.testing.assert_close(dst.backbone.main_blocks[0].attn.qkv.weight, src.main_blocks[0].attn.qkv.weight)


def test_input_size_not_a_multiple_of_the_largest_stride():
    vit = MaskedViT(img_size=96, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    adapter = DenseFeatureAdapter(
        vit, partial(SimpleFeaturePyramid.attach, out_channels=8), out_strides=(4, 8, 16, 32, 64), pool_name="pool"
    )
    with pytest.raises(
        ValueError, match=r"input size 100 \(data\.img_size.*largest stride 16.*data\.img_size=96 or 112"
    ):
        MaskRCNNDetection(adapter, optim=None, num_classes=3, min_size=100, max_size=100)


def test_checkpoint_of_another_backbone_family(tmp_path):
    convnext = MaskedConvNeXtV2(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], num_classes=0)
    vit = MaskedViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    adapter = DenseFeatureAdapter(vit, partial(SimpleFeaturePyramid.attach, out_channels=8))
    ours = _pretrain_checkpoint(tmp_path / "fcmae.ckpt", convnext)
    with pytest.raises(
        CheckpointMismatchError,
        match=rf"{ours}.*pre-trained with a MaskedConvNeXtV2 backbone.*"
        r"builds MaskedViT",
    ):
        adapter.load_pretrained(ours)
    torch.save({"model": convnext.state_dict()}, tmp_path / "official.pth")  # no stored config: judged by key names
    with pytest.raises(CheckpointMismatchError, match=r"official\.pth has no parameter of MaskedViT.*another backbone"):
        adapter.load_pretrained(tmp_path / "official.pth")


def test_ade_label_png_of_another_size_is_named(tmp_path):
    root = write_ade20k(tmp_path / "ade", num_train=3, num_val=1, size=32)
    label = sorted((root / "ADEChallengeData2016" / "annotations" / "training").glob("*.png"))[1]
    Image.fromarray(np.zeros((20, 24), np.uint8), mode="L").save(label)
    with pytest.raises(ValueError, match=rf"{label} is 24x20 but {label.stem}\.jpg is 32x32"):
        ADE20KSegmentation(root, "training")


def test_coco_json_naming_absent_files_fails_at_setup(coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    ann = root / "annotations" / "instances_train2017.json"
    names = [im["file_name"] for im in json.loads(ann.read_text())["images"]][:2]
    for name in names:
        (root / "train2017" / name).unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"2 image\(s\) listed in {ann} are absent from .*train2017.*{names[0]}"
    ):
        COCODataModule(str(root), img_size=64).setup()


def test_segmentation_recipe_follows_the_knob(tmp_path):
    cfg = compose_config(["experiment=segment_mae_vit_b_ade", "data.img_size=256", "logger=csv"], tmp_path)
    assert (cfg.task.crop_size, cfg.task.stride, cfg.model.backbone.img_size) == (256, 171, 256)
    cfg = compose_config(["experiment=detect_itpn_b_coco", "data.img_size=640", "logger=csv"], tmp_path)
    assert (cfg.task.min_size, cfg.task.max_size, cfg.model.backbone.img_size) == (640, 1066, 640)
    sizes = instantiate(cfg.data.train_transforms).transforms[0].min_size
    assert sizes[0] == 384 and sizes[-1] == 640 and len(sizes) == 11
