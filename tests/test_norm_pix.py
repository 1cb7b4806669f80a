import torch

from mimlab.losses import MaskedMSE
from mimlab.models.patchify import patchify
from mimlab.targets.pixels import NormPixTarget


def test_norm_pix_uses_unbiased_variance_and_eps_inside_sqrt():
    x = torch.randn(2, 3, 32, 32)
    target = NormPixTarget(patch_size=16)(x)
    p = patchify(x, 16)
    n = p.shape[-1]
    mean = p.sum(-1, keepdim=True) / n
    var = ((p - mean) ** 2).sum(-1, keepdim=True) / (n - 1)
    assert torch.allclose(target, (p - mean) / torch.sqrt(var + 1e-6), atol=1e-5)
    assert torch.equal(NormPixTarget(16, norm_pix=False)(x), p)


def test_to_image_inverts_the_normalisation():
    x = torch.randn(2, 3, 32, 32)
    t = NormPixTarget(16)
    assert torch.allclose(t.to_image(t(x), x), x, atol=1e-4)


def test_loss_is_mean_over_masked_patches_only():
    pred, target = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = (per_patch * mask).sum() / mask.sum()
    assert torch.allclose(MaskedMSE()(pred, target, mask)["loss"], expected)
    changed = pred.clone()
    changed[mask == 0] += 10.0  # visible patches do not count
    assert torch.allclose(MaskedMSE()(changed, target, mask)["loss"], expected)
