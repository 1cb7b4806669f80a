"""ViTDet attention (windowed blocks + global blocks + decomposed rel-pos) on the real MaskedViT, loaded from a plain
MAE checkpoint."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from timm.models.vision_transformer_sam import Block as WindowedBlock

from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.backbones.vitdet import ViTDetBackbone
from mimlab.models.necks.dense_adapter import DenseFeatureAdapter
from mimlab.models.necks.simple_fpn import SimpleFeaturePyramid

VIT = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def _mae_checkpoint(path, vit: MaskedViT):
    """A mimlab pre-training checkpoint of ``vit`` (random weights) with a decoder key and the stored config."""
    state = {f"backbone.{k}": torch.randn_like(v) for k, v in vit.state_dict().items()}
    state["decoder.pred.weight"] = torch.randn(4, 4)
    config = {"model": {"backbone": {"_target_": "mimlab.models.backbones.vit.MaskedViT"}}}
    torch.save({"state_dict": state, "mimlab": {"config": config}}, path)
    return state


def test_vitb_layout_global_blocks_and_rel_pos_tables():
    with torch.device("meta"):
        vit = ViTDetBackbone(
            img_size=1024,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            window_size=14,
            global_blocks=(2, 5, 8, 11),
        )
    assert [b.window_size for b in vit.blocks] == [14, 14, 0] * 4
    assert vit.blocks[0].attn.rel_pos_h.shape == (2 * 14 - 1, 64)  # window tables: (2·14-1, head_dim)
    assert vit.blocks[2].attn.rel_pos_w.shape == (2 * 64 - 1, 64)  # global tables span the 64x64 grid of 1024 px
    assert not hasattr(vit.norm, "weight") and not vit.cls_token.requires_grad


def test_loads_plain_mae_checkpoint_with_resampled_pos_embed(tmp_path, caplog):
    pretrain = MaskedViT(**VIT)
    state = _mae_checkpoint(tmp_path / "mae.ckpt", pretrain)
    vit = ViTDetBackbone(**{**VIT, "img_size": 128}, window_size=4, global_blocks=(1, 3))
    adapter = DenseFeatureAdapter(
        vit, partial(SimpleFeaturePyramid.attach, out_channels=16), out_strides=(4, 8, 16, 32)
    )
    with caplog.at_level("INFO"):
        report = adapter.load_pretrained(tmp_path / "mae.ckpt")
    assert "pos_embed: resampled from the checkpoint's 8x8 grid to the model's 16x16 grid" in caplog.text
    assert sorted(report["backbone"]["missing"]) == sorted(
        f"blocks.{i}.attn.rel_pos_{a}" for i in range(4) for a in "hw"
    )
    own = vit.state_dict()
    for key in [k for k in own if k.startswith(("blocks.", "patch_embed."))]:
        if "rel_pos" in key:
            assert own[key].abs().sum() == 0  # absent from MAE: ViTDet's zero init
        else:
            torch.testing.assert_close(own[key], state[f"backbone.{key}"])
    assert own["pos_embed"].shape == (1, 1 + 16 * 16, 32)
    out = adapter(torch.randn(1, 3, 128, 96))
    assert [tuple(y.shape[-2:]) for y in out.values()] == [(32, 24), (16, 12), (8, 6), (4, 3)]


def test_windowed_block_equals_attention_inside_each_window():
    """A windowed block = the same block with global attention run on every window alone (grid padded to windows)."""
    torch.manual_seed(0)
    vit = ViTDetBackbone(**VIT, window_size=3, global_blocks=(), rel_pos=False)
    block = vit.blocks[0]
    whole = WindowedBlock(32, 2, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), window_size=0)
    whole.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 7, 32)  # an 8x7 grid: windows of 3 pad it to 9x9
    y = block(x)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 2, 0, 1))
    for r in range(0, 9, 3):
        for c in range(0, 9, 3):
            window = padded[:, r : r + 3, c : c + 3]
            # attention sees the zero padding, the MLP and residual are per token: compare the real tokens
            expect = whole(window)[:, : max(0, min(3, 8 - r)), : max(0, min(3, 7 - c))]
            torch.testing.assert_close(y[:, r : r + 3, c : c + 3], expect)


def test_global_block_sees_the_whole_grid_and_windowed_does_not():
    torch.manual_seed(0)
    vit = ViTDetBackbone(**VIT, window_size=4, global_blocks=(1,), rel_pos=True).eval()
    x = torch.randn(1, 8, 8, 32)
    x2 = x.clone()
    x2[:, 7, 7] += 1.0  # change one token in the bottom-right window
    windowed, global_ = vit.blocks[0], vit.blocks[1]
    d = (windowed(x2) - windowed(x)).abs().sum(-1)[0]
    assert d[:4, :4].max() == 0 and d[4:, 4:].max() > 0  # other windows are untouched
    assert (global_(x2) - global_(x)).abs().sum(-1)[0, 0, 0] > 0


def test_rel_pos_bias_is_used_and_learns():
    torch.manual_seed(0)
    vit = ViTDetBackbone(**VIT, window_size=4, global_blocks=(1, 3))
    image = torch.randn(1, 3, 64, 64)
    before = vit.forward_features(image)[0]
    loss = before.square().mean()
    loss.backward()
    assert vit.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0 and vit.blocks[1].attn.rel_pos_w.grad.abs().sum() > 0
    with torch.no_grad():
        vit.blocks[0].attn.rel_pos_h.normal_()
    assert not torch.allclose(vit.forward_features(image)[0], before)


def test_masked_forward_is_refused():
    vit = ViTDetBackbone(**VIT, window_size=4, global_blocks=(1,))
    with pytest.raises(NotImplementedError, match="pre-train with MaskedViT"):
        vit(torch.randn(1, 3, 64, 64), torch.zeros(1, 64))
    with pytest.raises(ValueError, match=r"global_blocks \[4\]"):
        ViTDetBackbone(**VIT, global_blocks=(4,))
