"""Post-LayerNorm transformer block (BERT / wav2vec 2.0 layout), the block of data2vec 2.0's image encoder
(fairseq ``examples/data2vec/models/modalities/modules.py`` ``AltBlock`` with ``layer_norm_first=False``)::

    x = norm1(x + drop_path(attn(x)))
    x = norm2(x + drop_path(mlp(x)))

Built from timm's ``Attention`` and ``Mlp``; parameter names match timm's pre-norm ``Block`` (norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2). The FFN output ``mlp(x)`` *before* the residual is what data2vec 2.0 averages
into its targets; read it with a forward hook on ``block.mlp``. Shapes: (N, T, D) -> (N, T, D); ``attn_mask`` is an additive attention bias, as for timm's blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Attention
from torch import Tensor, nn


class PostNormBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm1 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm2 = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = self.norm1(x + self.drop_path(self.attn(x, attn_mask=attn_mask)))
        return self.norm2(x + self.drop_path(self.mlp(x)))
