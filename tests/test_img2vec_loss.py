"""Img2Vec loss math against a hand-written reference, and mask/teacher-grid alignment."""

import pytest
import torch

from mimlab.losses.img2vec import Img2VecLoss


def smooth_l1_reference(x, y, beta):
    d = (x - y).abs()
    return torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)


def test_loss_matches_reference_formula_on_random_tensors():
    torch.manual_seed(0)
    n, c, h, w = 3, 6, 2, 3
    target = torch.randn(n, c, h, w) * 3  # large enough that both smooth-L1 branches occur
    pred = {"tokens": torch.randn(n, h * w, c) * 3, "global": torch.randn(n, c)}
    mask = (torch.rand(n, h * w) < 0.6).float()
    mask[0, 0] = 1.0
    out = Img2VecLoss(beta=2.0, global_weight=0.5)(pred, target, mask)

    tokens = target.flatten(2).transpose(1, 2)
    terms = [
        smooth_l1_reference(pred["tokens"][i, k], tokens[i, k], 2.0).mean()
        for i in range(n)
        for k in range(h * w)
        if mask[i, k] == 1
    ]
    patch = sum(terms) / len(terms)
    glob = smooth_l1_reference(pred["global"], tokens.mean(1), 2.0).mean()
    assert out["loss_patch"].item() == pytest.approx(patch.item(), rel=1e-5)
    assert out["loss_global"].item() == pytest.approx(glob.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((patch + 0.5 * glob).item(), rel=1e-5)
    d = (pred["tokens"] - tokens).abs()
    assert (d < 2).any() and (d >= 2).any()


def test_patch_loss_only_sees_masked_teacher_tokens_in_row_major_order():
    target = torch.zeros(1, 4, 2, 2)
    pred = {"tokens": torch.zeros(1, 4, 4), "global": torch.zeros(1, 4)}
    mask = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    loss = Img2VecLoss()
    for k in range(4):
        wrong = {"tokens": pred["tokens"].clone(), "global": pred["global"]}
        wrong["tokens"][0, k] = 1.0
        assert (loss(wrong, target, mask)["loss_patch"] > 0) == (k == 1)
    visible = Img2VecLoss(positions="visible")
    wrong = {"tokens": pred["tokens"].clone(), "global": pred["global"]}
    wrong["tokens"][0, 1] = 1.0
    assert visible(wrong, target, mask)["loss_patch"] == 0


def test_unit_mask_is_upsampled_onto_a_finer_teacher_grid():
    """32-px units over a stride-16 (ViT/16) teacher: each unit covers 2x2 teacher tokens."""
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # 2x2 units, row-major
    target = torch.zeros(1, 3, 4, 4)
    loss = Img2VecLoss()
    for k in range(16):
        r, c = divmod(k, 4)
        pred = {"tokens": torch.zeros(1, 16, 3), "global": torch.zeros(1, 3)}
        pred["tokens"][0, k] = 1.0
        assert (loss(pred, target, mask)["loss_patch"] > 0) == bool(mask[0, (r // 2) * 2 + c // 2])
    with pytest.raises(ValueError, match="unit_size"):  # teacher grid coarser than the mask units
        loss({"tokens": torch.zeros(1, 4, 3), "global": torch.zeros(1, 3)}, torch.zeros(1, 3, 2, 2), torch.zeros(1, 16))


def test_shape_mismatch_and_bad_positions_are_clear_errors():
    with pytest.raises(ValueError, match="target.dim"):
        Img2VecLoss()(
            {"tokens": torch.zeros(1, 4, 3), "global": torch.zeros(1, 3)}, torch.zeros(1, 5, 2, 2), torch.ones(1, 4)
        )
    with pytest.raises(ValueError, match="loss.positions"):
        Img2VecLoss(positions="masked_only")
