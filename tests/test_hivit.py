"""HiViT backbone: parameter counts (docs/methods.md §7 rows 31, 34), mask-unit dropping, layouts, RPE."""

from __future__ import annotations

import pytest
import torch

from mimlab.models.backbones.hivit import HiViT, PatchMerge, map_to_units, relative_position_index, units_to_map

SIZES = {  # name: (kwargs, expected M params with rpe + ape + 1000-class head)
    "hivit_tiny": (dict(embed_dim=384, mlp_depth=2, depth=10, num_heads=6), 19.182),
    "hivit_small": (dict(embed_dim=384, mlp_depth=4, depth=20, num_heads=6), 37.526),
    "hivit_base": (dict(embed_dim=512, mlp_depth=4, depth=20, num_heads=8), 66.419),
    "itpn_base": (dict(embed_dim=512, mlp_depth=3, depth=24, num_heads=8), 78.558),
    "itpn_large": (dict(embed_dim=768, mlp_depth=2, depth=40, num_heads=12), 288.494),
}


def count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("name", list(SIZES))
def test_param_counts_match_methods_table(name):
    kwargs, expected = SIZES[name]
    with torch.device("meta"):
        model = HiViT(**kwargs, rpe=True, num_classes=1000)
    assert count(model) == pytest.approx(expected, abs=5e-4)


def test_hivit_base_without_rpe():
    with torch.device("meta"):
        model = HiViT(**SIZES["hivit_base"][0], rpe=False, num_classes=1000)
    assert count(model) == pytest.approx(66.302, abs=5e-4)  # docs/methods.md §4.1: "With rpe=False HiViT-B is 66.30M"


def tiny(**kw) -> HiViT:
    torch.manual_seed(0)
    return HiViT(**{**dict(embed_dim=32, mlp_depth=1, depth=2, num_heads=2, img_size=64), **kw}).eval()


def masks() -> torch.Tensor:
    mask = torch.ones(2, 16)
    mask[0, [0, 5, 6, 15]] = 0
    mask[1, [3, 4, 9, 10]] = 0
    return mask


@pytest.mark.parametrize("rpe", [False, True])
def test_visible_units_do_not_depend_on_masked_pixels(rpe):
    model, mask = tiny(rpe=rpe), masks()
    if rpe:  # non-zero tables so the bias matters
        for blk in model.main_blocks:
            torch.nn.init.normal_(blk.attn.relative_position_bias_table)
    x = torch.randn(2, 3, 64, 64)
    noise = torch.randn_like(x) * 5
    px_mask = mask.reshape(2, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    a = model(x, mask)
    b = model(x + noise * px_mask, mask)  # change only the masked units' pixels
    assert a.ids_keep.shape == (2, 4) and a.pyramid[2].shape == (2, 4, 32)
    for fa, fb in zip(a.pyramid, b.pyramid):
        torch.testing.assert_close(fa, fb)
    c = model(x + noise * (1 - px_mask), mask)  # ... while visible pixels do matter
    assert not torch.allclose(a.pyramid[2], c.pyramid[2])


def test_dropping_only_computes_visible_units_and_matches_rpe_reference():
    model, mask = tiny(rpe=True), masks()
    enc = model(torch.randn(2, 3, 64, 64), mask)
    assert torch.equal(enc.ids_keep[0], torch.tensor([0, 5, 6, 15]))
    ref = relative_position_index((4, 4))
    idx = model._rpe_index((4, 4), enc.ids_keep)
    for n in range(2):
        keep = enc.ids_keep[n]
        assert torch.equal(idx[n], ref[keep][:, keep])
    # the reference index: (dy + 3) * 7 + (dx + 3) between unit (0,0) and unit (1,2)
    assert ref[0, 6].item() == (0 - 1 + 3) * 7 + (0 - 2 + 3)


def test_forward_features_strides_and_channels():
    model = tiny()
    maps = model.forward_features(torch.randn(2, 3, 64, 64))
    assert model.out_strides == [4, 8, 16] and model.out_channels == [8, 16, 32]
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]
    masked = model.forward_features(torch.randn(2, 3, 64, 64), masks())
    assert (masked[2][0, :, 0, 1] == 0).all() and (masked[2][0, :, 0, 0] != 0).any()  # unit 1 masked, unit 0 visible


def test_unit_layout_round_trip_and_patch_embed_is_the_dense_conv():
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    units = model.patch_embed(x)  # (N, L, 4, 4, C)
    dense = model.patch_embed.norm(model.patch_embed.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(units_to_map(units, (4, 4)), dense)
    torch.testing.assert_close(map_to_units(dense, 4), units)


def test_patch_merge_concatenation_order():
    merge = PatchMerge(1)
    x = torch.arange(16.0).reshape(1, 1, 4, 4, 1)
    cat = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
    assert cat[0, 0, 0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]  # [x00, x10(row 1), x01(col 1), x11]
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(cat)))


def test_inpainting_mode_keeps_all_units_and_uses_mask_token():
    model, mask = tiny(drop_masked=False, keep_hidden=(0,)), masks()
    enc = model(torch.randn(2, 3, 64, 64), mask)
    assert enc.ids_keep is None and enc.pyramid[2].shape == (2, 16, 32) and set(enc.hidden) == {0}
    assert model.mask_token is not None


def test_bad_mask_and_image_sizes_raise_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="unit_size"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 60, 60), torch.zeros(1, 16))


def official_interpolate_pos_encoding(table: torch.Tensor, npatch: int, h: int, w: int) -> torch.Tensor:
    """iTPN ``models_itpn.py`` ``interpolate_pos_encoding(x, h, w)``: early return only when the *token count* equals
    the table length and h == w, otherwise bicubic resampling by ``scale_factor = (h + 0.1) / sqrt(N)`` (DINO's +0.1)."""
    import math

    n = table.shape[1]
    if npatch == n and w == h:
        return table
    dim, side = table.shape[-1], int(math.sqrt(n))
    out = torch.nn.functional.interpolate(
        table.reshape(1, side, side, dim).permute(0, 3, 1, 2),
        scale_factor=((h + 0.1) / math.sqrt(n), (w + 0.1) / math.sqrt(n)),
        mode="bicubic",
    )
    assert int(h + 0.1) == out.shape[-2] and int(w + 0.1) == out.shape[-1]
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim)


def test_itpn_pos_embed_option_reproduces_the_official_per_step_resampling():
    official_model = tiny(pos_embed_interpolation="itpn")
    x, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 16)
    mask[:, 1::2] = 1  # 8 of 16 units visible
    table = official_model.absolute_pos_embed.detach()
    reference = tiny()  # the default ("table") model with the table the official code would use at this step
    reference.absolute_pos_embed.data.copy_(official_interpolate_pos_encoding(table, npatch=8, h=4, w=4))
    with torch.no_grad():
        torch.testing.assert_close(official_model(x, mask).pyramid[-1], reference(x, mask).pyramid[-1])
        torch.testing.assert_close(official_model.forward_features(x)[-1], tiny().forward_features(x)[-1])  # full image
    assert torch.equal(official_model.position_embedding((4, 4), 16), table)  # the early return fires: all tokens
    assert torch.equal(tiny().position_embedding((4, 4), 8), table)  # default: the table as is, masked or not


def test_official_resampling_moves_the_itpn_b_table_by_up_to_a_tenth():
    """At 224 px (14x14 table, D=512) a masked official step resamples by 14.1/14: entries move by up to ~0.10."""
    model = HiViT(embed_dim=512, mlp_depth=1, depth=1, num_heads=8, img_size=224, pos_embed_interpolation="itpn")
    table = model.absolute_pos_embed.detach()
    moved = (model.position_embedding((14, 14), 49).detach() - table).abs().max().item()
    assert 0.05 < moved < 0.11
