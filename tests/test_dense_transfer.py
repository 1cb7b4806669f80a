"""Backbone → detector/segmenter adapter, checkpoint loading, evaluators and tiny training runs (real backbones)."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from mimlab.checkpoints import CheckpointMismatchError
from mimlab.data.ade20k import ADE20KDataModule
from mimlab.data.coco import COCODataModule, COCOInstances, lsj_transforms
from mimlab.data.synthetic_dense import write_ade20k, write_coco
from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2
from mimlab.models.backbones.hivit import HiViT
from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.heads.fcn import FCNHead
from mimlab.models.heads.upernet import UperNetHead
from mimlab.models.necks.dense_adapter import DenseFeatureAdapter
from mimlab.models.necks.fpn import TorchvisionFPN
from mimlab.models.necks.itpn_pyramid import ITPNPyramid
from mimlab.models.necks.simple_fpn import SimpleFeaturePyramid
from mimlab.optim import OptimizerFactory, ParamGroups, WarmupMultiStep
from mimlab.tasks.detection import MaskRCNNDetection
from mimlab.tasks.segmentation import UperNetSegmentation, slide_inference

DET_STRIDES = (4, 8, 16, 32, 64)
SMALL_DET = dict(
    min_size=64,
    max_size=64,
    anchor_sizes=(8, 16, 32, 64, 128),
    head_channels=16,
    representation_size=32,
    box_batch_size_per_image=32,
    rpn_pre_nms_top_n=100,
    rpn_post_nms_top_n=50,
)


def tiny_vit(dim=32):
    return MaskedViT(img_size=64, patch_size=16, embed_dim=dim, depth=2, num_heads=2, learnable_pos_embed=True)


def tiny_convnext():
    return MaskedConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


def tiny_hivit():
    return HiViT(embed_dim=32, mlp_depth=1, depth=2, num_heads=2, img_size=64)


def vit_adapter(dim=32, **kw):
    return DenseFeatureAdapter(tiny_vit(dim), partial(SimpleFeaturePyramid.attach, out_channels=16), **kw)


def convnext_adapter(**kw):
    return DenseFeatureAdapter(tiny_convnext(), partial(TorchvisionFPN.attach, out_channels=16), **kw)


def itpn_adapter(**kw):
    kw.setdefault("extra_pool", torch.nn.AvgPool2d(2, 2))
    return DenseFeatureAdapter(tiny_hivit(), ITPNPyramid([8, 16, 32], fpn_dim=16, fpn_depth=1), **kw)


def adamw(lr=1e-4, layer_decay=0.75):
    """The optim group's detection factory (AdamW, absolute lr, layer decay over the backbone's ids), constant lr."""
    return OptimizerFactory(
        partial(torch.optim.AdamW, betas=(0.9, 0.999)),
        lr=lr,
        weight_decay=0.05,
        warmup_epochs=0,
        param_groups=ParamGroups(layer_decay=layer_decay),
        schedule=WarmupMultiStep,
    )


def optimizer_of(task, total_steps=8):
    """``task.configure_optimizers()`` as Lightning calls it, with a stand-in for the Trainer's figures."""
    trainer = SimpleNamespace(
        world_size=1, accumulate_grad_batches=1, estimated_stepping_batches=total_steps, max_epochs=1
    )
    return task.optim(task, trainer, batch_size=2)["optimizer"]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"), num_train=8, num_val=4, size=64, seed=1)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return write_ade20k(tmp_path_factory.mktemp("ade"), num_train=4, num_val=2, size=64, seed=1)


@pytest.mark.parametrize("make", [vit_adapter, convnext_adapter, itpn_adapter])
def test_adapter_strides_and_channels(make):
    adapter = make(out_strides=DET_STRIDES, pool_name="pool")
    x = torch.randn(2, 3, 64, 48)  # 48 is not a multiple of 64: padded, then cropped back
    out = adapter(x)
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert adapter.out_channels == [16] * 5
    for (name, y), s in zip(out.items(), DET_STRIDES):
        assert y.shape == (2, 16, math.ceil(64 / s), math.ceil(48 / s)), name


def test_itpn_adapter_reuses_pyramid_and_pools_extra_level():
    adapter = itpn_adapter(out_strides=(4, 8, 16, 32))
    x = torch.randn(1, 3, 64, 64)
    out = list(adapter(x).values())
    pyramid = adapter.neck(adapter.backbone.forward_features(x))
    for a, b in zip(out[:3], pyramid):  # s4/s8/s16 are the pyramid's own outputs, no new FPN in between
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out[3], F.avg_pool2d(pyramid[2], 2, 2))


def test_itpn_concat_backbone_for_segmentation():
    adapter = itpn_adapter(out_strides=(4, 8, 16, 32), concat_backbone=True, extra_pool=torch.nn.MaxPool2d(2, 2))
    assert adapter.out_channels == [16 + 8, 16 + 16, 16 + 32, 16 + 32]
    out = list(adapter(torch.randn(1, 3, 64, 64)).values())
    assert [o.shape[1] for o in out] == adapter.out_channels


def test_single_scale_backbone_without_neck_is_an_error():
    with pytest.raises(ValueError, match="needs a neck"):
        DenseFeatureAdapter(tiny_vit(), None, out_strides=(4, 8, 16, 32))


def test_simple_fpn_vitdet_shapes():
    fpn = SimpleFeaturePyramid([768], [16], out_channels=256)
    assert fpn.out_strides == [4, 8, 16, 32]
    p8 = SimpleFeaturePyramid([192], [8], out_channels=32)  # patch-8 ViT: one deconv, identity, two max-pools
    assert [y.shape[-1] for y in p8([torch.randn(1, 192, 8, 8)])] == [16, 8, 4, 2]
    # the stride-4 path is two 2x2 deconvolutions 768→384→192, the stride-8 path one 768→384
    assert fpn.stages[0][0][0].weight.shape == (768, 384, 2, 2) and fpn.stages[0][0][3].weight.shape == (384, 192, 2, 2)
    assert fpn.stages[1][1].weight.shape == (256, 384, 1, 1) and fpn.stages[3][1].weight.shape == (256, 768, 1, 1)


def _fake_pretrain_ckpt(path, adapter):
    """A Lightning-style pre-training checkpoint with random backbone/neck weights plus decoder keys."""
    state = {f"backbone.{k}": torch.randn_like(v) for k, v in adapter.backbone.state_dict().items()}
    if adapter.neck is not None:
        state.update({f"neck.{k}": torch.randn_like(v) for k, v in adapter.neck.state_dict().items()})
    state["decoder.pred.weight"] = torch.randn(4, 4)
    torch.save({"state_dict": state, "mimlab": {"config": {}}}, path)
    return state


def test_detection_loads_backbone_and_itpn_pyramid_from_checkpoint(tmp_path):
    state = _fake_pretrain_ckpt(tmp_path / "pt.ckpt", itpn_adapter())
    task = MaskRCNNDetection(
        itpn_adapter(out_strides=DET_STRIDES, pool_name="pool"),
        adamw(),
        num_classes=3,
        pretrained=str(tmp_path / "pt.ckpt"),
        load_neck=True,
        **SMALL_DET,
    )
    for k, v in task.adapter.backbone.state_dict().items():
        torch.testing.assert_close(v, state[f"backbone.{k}"])
    for k, v in task.adapter.neck.state_dict().items():
        torch.testing.assert_close(v, state[f"neck.{k}"])


def test_segmentation_loads_vit_backbone_only(tmp_path):
    state = _fake_pretrain_ckpt(tmp_path / "pt.ckpt", DenseFeatureAdapter(tiny_vit(), out_strides=(16,)))
    fresh = vit_adapter()
    neck_before = {k: v.clone() for k, v in fresh.neck.state_dict().items()}
    task = UperNetSegmentation(
        fresh, partial(UperNetHead, channels=16), adamw(), num_classes=5, pretrained=str(tmp_path / "pt.ckpt")
    )
    for k, v in task.adapter.backbone.state_dict().items():
        torch.testing.assert_close(v, state[f"backbone.{k}"])
    for k, v in task.adapter.neck.state_dict().items():  # the simple FPN is new: untouched
        torch.testing.assert_close(v, neck_before[k])


def test_detection_starts_from_an_official_mae_file(tmp_path):
    src = tiny_vit()
    official = {**src.state_dict(), "mask_token": torch.zeros(1, 1, 16), "decoder_pred.weight": torch.zeros(3, 3)}
    torch.save({"model": official, "epoch": 1599}, tmp_path / "mae_pretrain_vit_tiny.pth")
    task = MaskRCNNDetection(
        vit_adapter(out_strides=DET_STRIDES, pool_name="pool"),
        adamw(),
        num_classes=3,
        pretrained=str(tmp_path / "mae_pretrain_vit_tiny.pth"),
        **SMALL_DET,
    )
    for k, v in src.state_dict().items():
        torch.testing.assert_close(task.backbone.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_checkpoint_shape_mismatch_names_the_key(tmp_path):
    _fake_pretrain_ckpt(tmp_path / "pt.ckpt", DenseFeatureAdapter(tiny_vit(dim=64), out_strides=(16,)))
    with pytest.raises(
        CheckpointMismatchError, match=r"blocks\.0\.attn\.proj\.bias: checkpoint \(64,\) vs model \(32,\)"
    ):
        vit_adapter().load_pretrained(tmp_path / "pt.ckpt")
    with pytest.raises(FileNotFoundError, match="make pretrain"):
        vit_adapter().load_pretrained(tmp_path / "absent.ckpt")


def test_coco_evaluator_perfect_and_shuffled(coco_root):
    ds = COCOInstances(coco_root, "val", lsj_transforms(64, train=False), keep_crowd=True)
    task = MaskRCNNDetection(
        vit_adapter(out_strides=DET_STRIDES, pool_name="pool"), adamw(), num_classes=3, **SMALL_DET
    )
    targets = [ds[i][1] for i in range(len(ds))]

    def score(shuffle: bool) -> dict:
        preds = []
        for t in targets:
            keep = t["iscrowd"] == 0
            labels = t["labels"][keep]
            if shuffle:
                labels = labels % 3 + 1  # every object gets a wrong class
            preds.append(
                {
                    "boxes": t["boxes"][keep],
                    "scores": torch.ones(int(keep.sum())),
                    "labels": labels,
                    "masks": t["masks"][keep][:, None].float(),
                }
            )
        p, g = task.to_metric_inputs(preds, targets)
        task.val_map.reset()
        task.val_map.update(p, g)
        return task.val_map.compute()

    perfect = score(False)
    assert perfect["bbox_map"] == pytest.approx(1.0) and perfect["segm_map"] == pytest.approx(1.0)
    wrong = score(True)
    assert wrong["bbox_map"] < 0.5 and wrong["segm_map"] < 0.5


def test_miou_perfect_and_shuffled():
    task = UperNetSegmentation(vit_adapter(), partial(UperNetHead, channels=16), adamw(), num_classes=6)
    label = torch.randint(0, 6, (1, 32, 32))
    label[:, :4] = 255
    task.val_miou.update(label.clamp(max=5), label)
    assert task.val_miou.compute() == pytest.approx(1.0)
    task.val_miou.reset()
    task.val_miou.update(label.clamp(max=5)[:, torch.randperm(32)], label)
    assert task.val_miou.compute() < 0.5


def test_slide_inference_equals_whole_image_for_pointwise_model():
    conv = torch.nn.Conv2d(3, 5, 1)
    image = torch.randn(2, 3, 70, 45)
    torch.testing.assert_close(slide_inference(conv, image, 5, crop=32, stride=21), conv(image).detach())


def _losses_on_one_batch(task, batch, steps: int) -> list[float]:
    opt = optimizer_of(task)
    task.train()
    out = []
    for _ in range(steps):
        loss = task.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_tiny_detection_run_loss_decreases(coco_root):
    torch.manual_seed(0)
    dm = COCODataModule(str(coco_root), batch_size=4, train_transforms=lsj_transforms(64, (0.9, 1.1)))
    dm.setup()
    task = MaskRCNNDetection(
        convnext_adapter(out_strides=DET_STRIDES, pool_name="pool"), adamw(lr=1e-3), num_classes=3, **SMALL_DET
    )
    losses = _losses_on_one_batch(task, next(iter(dm.train_dataloader())), 8)
    assert all(math.isfinite(v) for v in losses) and min(losses[-3:]) < 0.8 * losses[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_tiny_segmentation_run_loss_decreases(ade_root):
    torch.manual_seed(0)
    dm = ADE20KDataModule(str(ade_root), img_size=32, batch_size=2, photometric=False)
    dm.setup()
    task = UperNetSegmentation(
        itpn_adapter(out_strides=(4, 8, 16, 32)),
        partial(UperNetHead, channels=16),
        adamw(lr=1e-2),
        partial(FCNHead, channels=8),
        num_classes=150,
    )
    losses = _losses_on_one_batch(task, next(iter(dm.train_dataloader())), 12)
    assert all(math.isfinite(v) for v in losses) and min(losses[-3:]) < 0.8 * losses[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_trainer_fit_logs_map_and_miou(coco_root, ade_root, tmp_path):
    kw = dict(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    det = MaskRCNNDetection(vit_adapter(out_strides=DET_STRIDES, pool_name="pool"), adamw(), num_classes=3, **SMALL_DET)
    trainer = L.Trainer(**kw)
    trainer.fit(det, COCODataModule(str(coco_root), batch_size=2, train_transforms=lsj_transforms(64, (0.9, 1.1))))
    assert {"val/bbox_mAP", "val/segm_mAP"} <= set(trainer.callback_metrics)
    seg = UperNetSegmentation(
        vit_adapter(), partial(UperNetHead, channels=16), adamw(), num_classes=150, crop_size=32, stride=21
    )
    trainer = L.Trainer(**kw)
    trainer.fit(seg, ADE20KDataModule(str(ade_root), img_size=32, batch_size=2))
    assert 0.0 <= float(trainer.callback_metrics["val/mIoU"]) <= 1.0


def test_masked_vit_from_pretraining_checkpoint_through_simple_fpn(tmp_path):
    from mimlab.models.backbones.vit import MaskedViT

    def vit():
        return MaskedViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

    state = _fake_pretrain_ckpt(tmp_path / "pt.ckpt", DenseFeatureAdapter(vit(), out_strides=(8,)))
    adapter = DenseFeatureAdapter(
        vit(), partial(SimpleFeaturePyramid.attach, out_channels=16), out_strides=DET_STRIDES, pool_name="pool"
    )
    adapter.load_pretrained(tmp_path / "pt.ckpt")
    for k, v in adapter.backbone.state_dict().items():
        torch.testing.assert_close(v, state[f"backbone.{k}"])
    out = adapter(torch.randn(1, 3, 64, 48))  # larger than pre-training: the pos-embed is resampled
    assert [tuple(y.shape[-2:]) for y in out.values()] == [(16, 12), (8, 6), (4, 3), (2, 2), (1, 1)]
