"""Import of the official iTPN checkpoint layout (docs/methods.md §4.7) through the one loader, on synthetic state dicts in
that layout (backbone + pyramid; the pre-training decoder through the same fit check)."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from mimlab.checkpoints import CheckpointMismatchError, load_pretrained
from mimlab.checkpoints.itpn import convert_official_itpn
from mimlab.checkpoints.load import fit_state
from mimlab.models.backbones.hivit import HiViT
from mimlab.models.heads.itpn_clip_head import ITPNClipHead
from mimlab.models.heads.itpn_pixel_decoder import ITPNPixelDecoder
from mimlab.models.necks.itpn_pyramid import ITPNPyramid

M = 2  # C-MLP blocks per early stage -> official PatchMerge at blocks.2 and blocks.5


def build(seed: int, **kw):
    torch.manual_seed(seed)
    backbone = HiViT(embed_dim=32, mlp_depth=M, depth=2, num_heads=2, img_size=64, **kw)
    neck = ITPNPyramid([8, 16, 32], fpn_dim=16, fpn_depth=2)
    decoder = ITPNPixelDecoder(16, 32, 1, 2, img_size=64)
    return backbone, neck, decoder


def to_official(backbone, neck, decoder) -> dict:
    """Write the official key layout independently of the importer: one flat ``blocks`` list with PatchMerge inside."""
    order = (
        [f"stage4.{i}" for i in range(M)]
        + ["merge4"]
        + [f"stage8.{i}" for i in range(M)]
        + ["merge8"]
        + [f"main_blocks.{i}" for i in range(len(backbone.main_blocks))]
    )
    sd = {}
    for k, v in backbone.state_dict().items():
        head = next((o for o in order if k.startswith(o + ".")), None)
        sd[f"blocks.{order.index(head)}.{k[len(head) + 1 :]}" if head else k] = v
    sd["relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)  # official persistent buffer
    sd.update(neck.state_dict())
    for k, v in decoder.state_dict().items():
        sd[k.replace("embed.decoder_embed", "decoder_embed")] = v
    return {"model": {"module." + k: v for k, v in sd.items()}}


def test_official_layout_round_trip():
    src = build(0)
    ckpt = to_official(*src)
    assert "module.blocks.2.reduction.weight" in ckpt["model"] and "module.blocks.5.norm.weight" in ckpt["model"]
    assert "module.mask_token" in ckpt["model"] and "module.decoder_embed.2.1.weight" in ckpt["model"]
    dst = build(1)
    load_pretrained(ckpt, dst[0], dst[1])
    fit_state(dst[2], convert_official_itpn(ckpt)["decoder"], "ckpt", "official iTPN")
    x, mask = torch.randn(2, 3, 64, 64), torch.ones(2, 16)
    mask[:, ::4] = 0
    out = [m.eval() for m in src], [m.eval() for m in dst]
    preds = [dec(neck(bb(x, mask)), mask) for bb, neck, dec in out]
    torch.testing.assert_close(preds[0], preds[1])


def test_pretrain_checkpoint_into_finetune_model_with_rpe_and_head(tmp_path):
    src = build(0)
    path = tmp_path / "itpn_pixel.pth"
    torch.save({**to_official(*src), "args": argparse.Namespace(model="itpn_base"), "epoch": 3}, path)  # MAE-style
    finetune = HiViT(embed_dim=32, mlp_depth=M, depth=2, num_heads=2, img_size=64, rpe=True, num_classes=10)
    report = load_pretrained(
        path,
        finetune,
        ITPNPyramid([8, 16, 32], 16, 2),
        allow_missing=["*relative_position_bias_table", "fc_norm.*", "head.*"],
    )
    torch.testing.assert_close(finetune.main_blocks[1].mlp.fc2.weight, src[0].main_blocks[1].mlp.fc2.weight)
    assert (finetune.main_blocks[0].attn.relative_position_bias_table == 0).all()
    assert sorted(report["backbone"]["missing"]) == sorted(
        ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        + [f"main_blocks.{i}.attn.relative_position_bias_table" for i in range(2)]
    )
    assert "relative_position_index" in convert_official_itpn(torch.load(path, weights_only=False))["unused"]


def test_clip_checkpoint_routes_mask_token_to_backbone():
    backbone, neck, _ = build(0, drop_masked=False, keep_hidden=(1,))
    head = ITPNClipHead(embed_dim=32, fpn_dim=16, teacher_dim=8, num_heads=2, aux_block=1, img_size=64, rpe=False)
    sd = to_official(backbone, neck, head)["model"]
    parts = convert_official_itpn(sd)
    assert "mask_token" in parts["backbone"] and "lm_cls_head.weight" in parts["decoder"]
    load_pretrained(sd, build(1, drop_masked=False)[0])


def test_mismatches_raise_clear_errors():
    ckpt = to_official(*build(0))
    deeper = HiViT(embed_dim=32, mlp_depth=M, depth=3, num_heads=2, img_size=64)
    with pytest.raises(CheckpointMismatchError, match=re.escape("missing in checkpoint (") + r".*main_blocks\.2\."):
        load_pretrained(ckpt, deeper)
    wider = HiViT(embed_dim=64, mlp_depth=M, depth=2, num_heads=2, img_size=64)
    with pytest.raises(CheckpointMismatchError, match="official iTPN layout.*\n.*shape mismatches"):
        load_pretrained(ckpt, wider)
    no_merge = {k: v for k, v in ckpt["model"].items() if "blocks.5." not in k}
    with pytest.raises(ValueError, match="PatchMerge"):
        convert_official_itpn(no_merge)
    with pytest.raises(FileNotFoundError, match="saved locally"):
        load_pretrained("/nonexistent/itpn.pth", deeper)


def test_detection_starts_from_an_official_itpn_file_with_its_pyramid(tmp_path):
    from functools import partial

    from mimlab.models.necks.dense_adapter import DenseFeatureAdapter
    from mimlab.optim import OptimizerFactory, ParamGroups
    from mimlab.tasks.detection import MaskRCNNDetection

    src = build(0)
    torch.save({**to_official(*src), "args": argparse.Namespace(model="itpn_base")}, tmp_path / "itpn_pixel.pth")
    backbone, neck, _ = build(1)
    adapter = DenseFeatureAdapter(
        backbone, neck, out_strides=(4, 8, 16, 32, 64), pool_name="pool", extra_pool=torch.nn.AvgPool2d(2, 2)
    )
    task = MaskRCNNDetection(
        adapter,
        OptimizerFactory(partial(torch.optim.AdamW), lr=1e-4, param_groups=ParamGroups(0.9)),
        num_classes=3,
        pretrained=str(tmp_path / "itpn_pixel.pth"),
        load_neck=True,
        min_size=64,
        max_size=64,
        anchor_sizes=(8, 16, 32, 64, 128),
        head_channels=16,
        representation_size=32,
    )
    for mine, official in ((task.backbone, src[0]), (task.adapter.neck, src[1])):
        for k, v in official.state_dict().items():
            torch.testing.assert_close(mine.state_dict()[k], v, rtol=0, atol=0, msg=k)
