"""FCMAE decoder (docs/methods.md §7 rows 24, 25, 27) and the torch.compile path of encoder + decoder."""

import pytest
import torch

from mimlab.models.backbones.contract import Encoding
from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2
from mimlab.models.heads.fcmae_decoder import FCMAEDecoder


def encoded(feature_map: torch.Tensor) -> Encoding:
    return Encoding.of_map(feature_map, None)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("in_channels, expected_m", [(320, 3.871), (1024, 4.232)])  # Atto, Base
def test_decoder_params_match_rows_24_25(in_channels, expected_m):
    with torch.device("meta"):
        assert round(count(FCMAEDecoder(in_channels)) / 1e6, 3) == expected_m


def test_decoder_at_224_predicts_3072_values_for_each_of_49_units():
    with torch.device("meta"):
        encoder, decoder = MaskedConvNeXtV2((2, 2, 6, 2), (40, 80, 160, 320)), FCMAEDecoder(320)
        mask = torch.ones(2, 49)
        pred = decoder(encoder(torch.empty(2, 3, 224, 224), mask), mask)
    assert pred.shape == (2, 49, 32 * 32 * 3) and len(decoder.decoder) == 1 and decoder.proj.out_channels == 512


def test_mask_token_replaces_masked_units_only():
    decoder = FCMAEDecoder(16, embed_dim=8, patch_size=4).eval()
    x = torch.randn(1, 16, 2, 2)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    changed = x.clone()
    changed[:, :, 0, 1] += 5.0  # unit 1 is masked: its encoder value is discarded for the token
    torch.testing.assert_close(decoder(encoded(changed), mask), decoder(encoded(x), mask))
    assert not torch.allclose(decoder(encoded(x + 1.0), mask), decoder(encoded(x), mask))
    with pytest.raises(ValueError, match="unit_size=32"):
        decoder(encoded(x), torch.zeros(1, 16))


def test_encoder_and_decoder_compile_without_graph_breaks():
    torch.manual_seed(0)
    encoder = MaskedConvNeXtV2((1, 1, 1, 1), (8, 16, 16, 16))
    decoder = FCMAEDecoder(16, embed_dim=16, patch_size=32)

    def step(x, mask):
        return decoder(encoder(x, mask), mask)

    x, mask = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 1]])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x, mask), step(x, mask))
    compiled(x, mask).square().mean().backward()
    assert encoder.stages[0][0].dwconv.weight.grad is not None
