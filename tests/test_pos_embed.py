import numpy as np
import torch

from mimlab.models.pos_embed import sincos_2d_pos_embed


def reference_mae_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """The MAE recipe written out (docs/methods.md §2.1): meshgrid(grid_w, grid_h), first half encodes grid[0] (w)."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # grid[0] varies along w

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_matches_mae_formula_with_zero_cls_row():
    ours = sincos_2d_pos_embed(64, 5, cls_token=True)
    ref = torch.from_numpy(reference_mae_pos_embed(64, 5)).float()
    assert ours.shape == (26, 64)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.count_nonzero(ours[0]) == 0


def test_first_half_encodes_column():
    emb = sincos_2d_pos_embed(16, (3, 4))
    # tokens in the same column (w) share the first half; tokens in the same row (h) share the second half
    assert torch.equal(emb[1, :8], emb[1 + 4, :8])
    assert torch.equal(emb[4, 8:], emb[5, 8:])
    assert not torch.equal(emb[0, :8], emb[1, :8])
