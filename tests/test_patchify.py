import torch

from mimlab.models.patchify import patchify, unpatchify


def test_round_trip_is_exact():
    x = torch.randn(2, 3, 32, 48)
    assert torch.equal(unpatchify(patchify(x, 8), 8, grid=(4, 6)), x)


def test_layout_is_row_col_channel_with_channel_fastest():
    """docs/methods.md §1: patch l = (row i, col j); value index (r*p + c)*C + ch holds img[ch, i*p + r, j*p + c]."""
    p, c = 4, 3
    x = torch.arange(2 * c * 8 * 12, dtype=torch.float32).reshape(2, c, 8, 12)
    out = patchify(x, p)
    assert out.shape == (2, 2 * 3, p * p * c)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                for r in range(p):
                    for col in range(p):
                        for ch in range(c):
                            assert out[n, i * 3 + j, (r * p + col) * c + ch] == x[n, ch, i * p + r, j * p + col]


def test_rejects_indivisible_size():
    import pytest

    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 32), 16)
