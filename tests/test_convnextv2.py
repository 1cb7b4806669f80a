"""ConvNeXt V2 backbone: sizes (docs/methods.md §7 rows 19, 23, 24, 25, 29), GRN, masked-dense leakage, timm equivalence."""

from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timm.layers.grn import GlobalResponseNorm
from timm.models.convnext import ConvNeXt

from mimlab.checkpoints import load_pretrained
from mimlab.models.backbones.convnextv2 import ConvNeXtV2Block, MaskedConvNeXtV2
from mimlab.models.layers.grn import GRN

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "backbone"
# row 19: classifier with a 1000-class head (M, 3 decimals); row 24/25: FCMAE encoder without head / final norm.
PARAMS_M = {
    "atto": 3.708,
    "femto": 5.233,
    "pico": 9.066,
    "nano": 15.624,
    "tiny": 28.635,
    "base": 88.718,
    "large": 197.957,
    "huge": 660.290,
}
ENCODER_M = {"atto": 3.387, "base": 87.691}


def count(module):
    return sum(p.numel() for p in module.parameters())


def build(size, **overrides):
    cfg = OmegaConf.load(CONF / f"convnextv2_{size}.yaml")
    with torch.device("meta"):
        return instantiate(cfg, **overrides)


@pytest.mark.parametrize("size", list(PARAMS_M))
def test_classifier_params_match_row_19(size):
    assert round(count(build(size, num_classes=1000)) / 1e6, 3) == PARAMS_M[size]


@pytest.mark.parametrize("size", list(ENCODER_M))
def test_fcmae_encoder_params_match_rows_24_25(size):
    assert round(count(build(size)) / 1e6, 3) == ENCODER_M[size]


@pytest.mark.parametrize("dim", [40, 128, 352, 2816])
def test_block_params_are_8c2_plus_65c(dim):
    with torch.device("meta"):
        block = ConvNeXtV2Block(dim, drop_path=0.1)
    assert count(block) == 8 * dim**2 + 65 * dim


def test_grn_is_identity_at_init_and_matches_reference_formula():
    grn = GRN(8)
    x = torch.randn(2, 5, 6, 8)
    assert torch.equal(grn(x), x)
    torch.nn.init.normal_(grn.gamma)
    torch.nn.init.normal_(grn.beta)
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()  # ||X||_2 over (H, W)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)  # divided by the channel mean (code), not the sum (paper)
    torch.testing.assert_close(grn(x), grn.gamma * (x * nx) + grn.beta + x)
    ref = GlobalResponseNorm(8)  # timm's GRN as an independent reference
    ref.weight.data.copy_(grn.gamma)
    ref.bias.data.copy_(grn.beta)
    torch.testing.assert_close(grn(x), ref(x))


def test_masked_grn_uses_visible_positions_of_each_sample_only():
    grn = GRN(4)
    torch.nn.init.normal_(grn.gamma)
    x = torch.randn(2, 4, 4, 4)
    mask = (torch.rand(2, 4, 4, 1) > 0.5).float()
    mask[0, 0, 0] = 0.0
    out = grn(x, mask)
    for n in range(2):  # reference: gather the visible positions of sample n, dense GRN statistics on them
        vis = x[n][mask[n, ..., 0] == 0]  # (V, C)
        gx = vis.pow(2).sum(0).sqrt()
        nx = gx / (gx.mean() + 1e-6)
        torch.testing.assert_close(out[n], grn.gamma * (x[n] * nx) + grn.beta + x[n])
    torch.testing.assert_close(grn(x, torch.zeros_like(mask)), grn(x))
    x2 = x.clone()
    x2[mask.expand_as(x) > 0] = 100.0  # masked values do not enter the statistics
    torch.testing.assert_close(grn(x2, mask)[mask.expand_as(x) == 0], out[mask.expand_as(x) == 0])


def tiny(num_classes=0):
    torch.manual_seed(0)
    model = MaskedConvNeXtV2(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=num_classes)
    for name, p in model.named_parameters():  # non-zero GRN so that the masked statistics matter
        if "grn" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def test_masked_pixels_do_not_leak_into_visible_outputs():
    model = tiny()
    x = torch.randn(2, 3, 96, 96)  # 3x3 units of 32 px
    mask = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 1, 0, 1, 1]], dtype=torch.float)
    pixel_mask = mask.reshape(2, 1, 3, 3).repeat_interleave(32, 2).repeat_interleave(32, 3)
    with torch.no_grad():
        feats = model.forward_features(x, mask)
        noisy = x + 10 * torch.randn_like(x) * pixel_mask  # change only pixels inside masked units
        feats_noisy = model.forward_features(noisy, mask)
        changed_visible = model.forward_features(x + torch.randn_like(x) * (1 - pixel_mask), mask)
    for f, g, h, stride in zip(feats, feats_noisy, changed_visible, model.out_strides):
        m = pixel_mask[:, :, ::stride, ::stride].expand_as(f)
        torch.testing.assert_close(g, f, rtol=0, atol=1e-6)  # every visible (and masked) output is unchanged
        assert torch.all(f[m > 0] == 0)  # masked positions are zero, like the absent points of a sparse tensor
        assert (h - f)[m == 0].abs().max() > 1e-3  # visible pixels do matter (the test can fail)


def test_dense_path_and_head_match_timm_convnextv2():
    ref = ConvNeXt(
        depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5, ls_init_value=None, use_grn=True, conv_mlp=False
    ).eval()  # timm ConvNeXt V2 layout (Linear MLP)
    for name, p in ref.named_parameters():
        if "grn" in name or name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    model = tiny(num_classes=5)
    load_pretrained(ref.state_dict(), model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model(x).map), ref(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            model(x, torch.zeros(2, 4)).map, model(x).map
        )  # an all-visible mask is the dense path


def test_timm_atto_with_conv_mlp_loads_and_matches():
    ref = timm.create_model("convnextv2_atto", pretrained=False, num_classes=3).eval()
    model = MaskedConvNeXtV2((2, 2, 6, 2), (40, 80, 160, 320), num_classes=3).eval()
    load_pretrained(ref.state_dict(), model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model(x).map), ref(x), rtol=1e-4, atol=1e-5)


def test_features_contract_and_bad_mask_error():
    model = tiny()
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.out_channels == [8, 16, 24, 32]
    assert [64 // f.shape[-1] for f in feats] == model.out_strides == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="mask has L=5 units"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="unit_size"):  # 16-px units are finer than the stride-32 stage
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 16))


def minkowski_grn(features: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ConvNeXt-V2 ``MinkowskiGRN`` on the feature matrix of a sparse tensor: ``features`` (P, C) = the active points
    of every sample of the batch; ``Gx = torch.norm(x.F, p=2, dim=0)``, ``Nx = Gx / (Gx.mean(-1) + 1e-6)``."""
    gx = torch.norm(features, p=2, dim=0, keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    return gamma * (features * nx) + beta + features


def test_batch_pooled_grn_reproduces_minkowski_grn_on_the_visible_points():
    grn = GRN(6, masked_pooling="batch")
    torch.nn.init.normal_(grn.gamma)
    torch.nn.init.normal_(grn.beta)
    x = torch.randn(3, 4, 4, 6)
    mask = (torch.rand(3, 4, 4, 1) > 0.5).float()
    visible = mask[..., 0] == 0
    out = grn(x, mask)
    torch.testing.assert_close(out[visible], minkowski_grn(x[visible], grn.gamma, grn.beta))  # (P, C) active points
    per_sample = GRN(6)
    per_sample.load_state_dict(grn.state_dict())
    assert (per_sample(x, mask)[visible] - out[visible]).abs().max() > 1e-3  # the two poolings differ
    torch.testing.assert_close(grn(x), per_sample(x))  # without a mask (fine-tuning) both are the dense GRN


def test_backbone_grn_pooling_option_reaches_every_block():
    model = MaskedConvNeXtV2(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), grn_masked_pooling="batch")
    assert {m.masked_pooling for m in model.modules() if isinstance(m, GRN)} == {"batch"}
    with pytest.raises(ValueError, match="masked_pooling must be 'sample' or 'batch'"):
        GRN(4, masked_pooling="global")
