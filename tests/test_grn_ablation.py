"""The GRN ablation backbone (experiments/fcmae_grn): same model minus GRN, equal to V2 at init."""

import torch

from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2
from mimlab.models.backbones.convnextv2_ablation import NoGRN, convnextv2_without_grn
from mimlab.models.layers.grn import GRN

KW = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32])


def test_without_grn_drops_exactly_the_grn_parameters_and_matches_v2_at_init():
    torch.manual_seed(0)
    with_grn = MaskedConvNeXtV2(**KW)
    without = convnextv2_without_grn(**KW)
    assert not any(isinstance(m, GRN) for m in without.modules())
    assert sum(isinstance(m, NoGRN) for m in without.modules()) == 4
    grn_params = sum(p.numel() for n, p in with_grn.named_parameters() if ".grn." in n)
    assert grn_params == 2 * 4 * sum(KW["dims"])  # gamma and beta of width 4·dim per block
    assert sum(p.numel() for p in with_grn.parameters()) - sum(p.numel() for p in without.parameters()) == grn_params
    missing = without.load_state_dict(with_grn.state_dict(), strict=False)
    assert not missing.missing_keys and all(".grn." in k for k in missing.unexpected_keys)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(with_grn.forward_features(x)[-1], without.forward_features(x)[-1], atol=1e-5)
    for m in with_grn.modules():  # once GRN has learnt something the two differ
        if isinstance(m, GRN):
            torch.nn.init.constant_(m.gamma, 1.0)
    assert not torch.allclose(with_grn.forward_features(x)[-1], without.forward_features(x)[-1], atol=1e-3)
