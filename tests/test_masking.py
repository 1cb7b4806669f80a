import pytest
import torch

from mimlab.masking import RandomMasking, keep_indices, mask_to_token_grid, upsample_mask


@pytest.mark.parametrize(
    "grid,ratio,keep,masked",
    [
        ((14, 14), 0.75, 49, 147),  # MAE ViT-B/L @224 (docs/methods.md §7 row 9)
        ((16, 16), 0.75, 64, 192),  # MAE ViT-H/14 @224
        ((7, 7), 0.6, 19, 30),
    ],  # FCMAE 32-px units @224 (row 26)
)
def test_counts_match_methods_table(grid, ratio, keep, masked):
    mask = RandomMasking(ratio, unit_size=16)(8, grid, torch.Generator().manual_seed(0))
    assert mask.shape == (8, grid[0] * grid[1])
    assert torch.all(mask.sum(1) == masked)
    assert torch.all((1 - mask).sum(1) == keep)


def test_deterministic_under_seed_and_different_across_seeds():
    m = RandomMasking(0.75, 16)
    a = m(4, (14, 14), torch.Generator().manual_seed(3))
    b = m(4, (14, 14), torch.Generator().manual_seed(3))
    c = m(4, (14, 14), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_matches_mae_random_masking_for_the_same_noise():
    """MAE: noise -> argsort -> keep the first len_keep of the shuffle; same generator state -> same mask."""
    g = torch.Generator().manual_seed(11)
    ours = RandomMasking(0.75, 16)(2, (14, 14), g)
    noise = torch.rand(2, 196, generator=torch.Generator().manual_seed(11))
    ids_shuffle = torch.argsort(noise, dim=1)
    ref = torch.ones(2, 196)
    ref.scatter_(1, ids_shuffle[:, :49], 0.0)
    assert torch.equal(ours, ref)


def test_positions_are_masked_uniformly():
    mask = RandomMasking(0.6, 32)(4000, (7, 7), torch.Generator().manual_seed(0))
    freq = mask.mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 30 / 49), atol=0.03)


def test_upsample_and_keep_indices():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # 2x2 units
    up = upsample_mask(mask, (2, 2), 2)
    assert up.reshape(4, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert torch.equal(mask_to_token_grid(mask, (4, 4)), up)
    assert keep_indices(up, 8).tolist() == [[2, 3, 6, 7, 8, 9, 12, 13]]
    with pytest.raises(ValueError, match="unit_size"):
        mask_to_token_grid(mask, (3, 3))


def test_ratio_is_validated():
    with pytest.raises(ValueError, match="masking.ratio"):
        RandomMasking(1.0, 16)


def test_block_masking_aspects_are_checked_when_built():
    from mimlab.masking.blockwise import BlockMasking

    with pytest.raises(ValueError, match=r"masking\.min_aspect must be > 0 \(a block's height / width\), got -0\.3"):
        BlockMasking(min_aspect=-0.3)
    with pytest.raises(ValueError, match=r"masking\.max_aspect must be >= masking\.min_aspect=0\.3, got 0\.1"):
        BlockMasking(min_aspect=0.3, max_aspect=0.1)
