"""ConvNeXt V2 without GRN, for the GRN ablation (ConvNeXt V2 paper, Fig. 3/4 and Table 2a: "w/o GRN").

``convnextv2_without_grn(**kwargs)`` builds a ``MaskedConvNeXtV2`` with the same arguments and replaces the GRN of
every block by an identity, so the block is LN -> pwconv1 -> GELU -> pwconv2 (the ConvNeXt V1 MLP). Everything
else (masked-dense behaviour, contract, parameter names apart from ``grn.*``) is unchanged. GRN starts as the
identity (gamma = beta = 0), so the two models are equal at initialisation and differ only by what training does.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2
from mimlab.models.layers.grn import GRN


class NoGRN(nn.Module):
    """Identity with GRN's call signature ``(x (N, H, W, C), mask=None) -> x``."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return x


def convnextv2_without_grn(**kwargs: Any) -> MaskedConvNeXtV2:
    model = MaskedConvNeXtV2(**kwargs)
    for module in model.modules():
        if isinstance(getattr(module, "grn", None), GRN):
            module.grn = NoGRN()
    return model
