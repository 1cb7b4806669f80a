"""MAE composition: parameter counts (docs/methods.md §7 rows 1-7, 9, 10) and equivalence with the official forward order."""

import pytest
import torch
from torch import nn

from mimlab.masking import RandomMasking
from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.heads.mae_decoder import MAEDecoder

SIZES = {  # patch, dim, depth, heads
    "B": (16, 768, 12, 12),
    "L": (16, 1024, 24, 16),
    "H": (14, 1280, 32, 16),
}


def build(size: str):
    p, d, depth, heads = SIZES[size]
    with torch.device("meta"):
        encoder = MaskedViT(224, p, 3, d, depth, heads)
        decoder = MAEDecoder(d, 224, p)
    return encoder, decoder


def count(*modules: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("size,expected", [("B", 86.568e6), ("L", 304.327e6), ("H", 632.046e6)])
def test_classifier_params_rows_1_to_3(size, expected):
    encoder, _ = build(size)
    head = nn.Linear(encoder.embed_dim, 1000, device="meta")
    assert round(count(encoder, head) / 1e6, 3) == pytest.approx(expected / 1e6, abs=5e-4)


@pytest.mark.parametrize(
    "size,total,decoder_only", [("B", 111.908e6, 26.109e6), ("L", 329.542e6, 26.240e6), ("H", 657.075e6, 26.310e6)]
)
def test_pretrain_and_decoder_params_rows_4_to_7(size, total, decoder_only):
    encoder, decoder = build(size)
    assert round(count(encoder, decoder) / 1e6, 3) == pytest.approx(total / 1e6, abs=5e-4)
    assert round(count(decoder) / 1e6, 3) == pytest.approx(decoder_only / 1e6, abs=5e-4)


def test_trainable_params_exclude_fixed_pos_embeds_row_4():
    encoder, decoder = build("B")
    assert round(count(encoder, decoder, trainable_only=True) / 1e6, 3) == pytest.approx(111.656, abs=5e-4)


@pytest.mark.parametrize("patch,keep,out_dim", [(16, 49, 768), (14, 64, 588)])
def test_kept_tokens_and_target_dim_rows_9_10(patch, keep, out_dim):
    torch.manual_seed(0)
    encoder = MaskedViT(224, patch, 3, 32, 1, 2)
    decoder = MAEDecoder(32, 224, patch, embed_dim=32, depth=1, num_heads=2)
    grid = (224 // patch, 224 // patch)
    mask = RandomMasking(0.75, patch)(2, grid, torch.Generator().manual_seed(0))
    enc = encoder(torch.randn(2, 3, 224, 224), mask)
    assert enc.tokens.shape == (2, 1 + keep, 32)
    assert decoder(enc, mask).shape == (2, grid[0] * grid[1], out_dim)


def reference_mae_forward(encoder: MaskedViT, decoder: MAEDecoder, x: torch.Tensor, noise: torch.Tensor, ratio: float):
    """The official MAE order (models_mae.py): shuffle by noise, keep the first len_keep in *shuffled* order."""
    tokens = encoder.patch_embed(x) + encoder.pos_embed[:, 1:]
    n, length, d = tokens.shape
    len_keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, d))
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(n, -1, -1)
    h = torch.cat([cls, kept], 1)
    for blk in encoder.blocks:
        h = blk(h)
    h = decoder.decoder_embed(encoder.norm(h))
    mask_tokens = decoder.mask_token.repeat(n, length + 1 - h.shape[1], 1)
    y = torch.cat([h[:, 1:], mask_tokens], 1)
    y = torch.gather(y, 1, ids_restore[:, :, None].expand(-1, -1, y.shape[2]))
    y = torch.cat([h[:, :1], y], 1) + decoder.decoder_pos_embed
    for blk in decoder.decoder_blocks:
        y = blk(y)
    return decoder.decoder_pred(decoder.decoder_norm(y))[:, 1:]


def test_prediction_equals_official_forward_order():
    torch.manual_seed(0)
    encoder = MaskedViT(32, 8, 3, 32, 2, 2).eval()
    decoder = MAEDecoder(32, 32, 8, embed_dim=16, depth=2, num_heads=2).eval()
    x = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(5))
    mask = RandomMasking(0.75, 8)(3, (4, 4), torch.Generator().manual_seed(5))
    ours = decoder(encoder(x, mask), mask)
    ref = reference_mae_forward(encoder, decoder, x, noise, 0.75)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_masked_pixels_do_not_reach_the_encoder():
    torch.manual_seed(0)
    encoder = MaskedViT(32, 8, 3, 32, 2, 2).eval()
    mask = RandomMasking(0.5, 8)(2, (4, 4), torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 32, 32)
    pixel_mask = mask.reshape(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    y = x + 5 * torch.randn_like(x) * pixel_mask
    assert torch.allclose(encoder(x, mask).tokens, encoder(y, mask).tokens, atol=1e-6)


def test_coarse_unit_mask_is_upsampled_to_patches():
    encoder = MaskedViT(64, 16, 3, 32, 1, 2)
    mask = RandomMasking(0.5, 32)(2, (2, 2), torch.Generator().manual_seed(0))  # 32-px units on 16-px patches
    enc = encoder(torch.randn(2, 3, 64, 64), mask)
    assert enc.mask.shape == (2, 16) and enc.tokens.shape == (2, 1 + 8, 32)


def test_forward_features_contract():
    encoder = MaskedViT(32, 8, 3, 32, 1, 2)
    maps = encoder.forward_features(torch.randn(2, 3, 48, 32))  # other sizes resample the pos-embed
    assert encoder.out_strides == [8] and encoder.out_channels == [32]
    assert [m.shape for m in maps] == [torch.Size([2, 32, 6, 4])]
