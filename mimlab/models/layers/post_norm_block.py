"""Post-LayerNorm transformer block (BERT / wav2vec 2.0 layout), the block of data2vec 2.0's image encoder
(fairseq ``examples/data2vec/models/modalities/modules.py`` ``AltBlock`` with ``layer_norm_first=False``)::

    x = norm1(x + drop_path(attn(x)))
    x = norm2(x + drop_path(mlp(x)))

Built from timm's ``Attention`` and ``Mlp``; parameter names match timm's pre-norm ``Block`` (norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2). The FFN output ``mlp(x)`` *before* the residual is what data2vec 2.0 averages
into its targets: :meth:`PostNormBlock.forward_with_ffn` returns it beside the block output
(:func:`block_with_ffn` does the same for timm's pre-norm ``Block``). Shapes: (N, T, D) -> (N, T, D); ``attn_mask`` is
an additive attention bias, as for timm's blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Attention, Block
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
        return self.forward_with_ffn(x, attn_mask)[0]

    def forward_with_ffn(self, x: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(block output, FFN output before its residual), both (N, T, D)."""
        x = self.norm1(x + self.drop_path(self.attn(x, attn_mask=attn_mask)))
        ffn = self.mlp(x)
        return self.norm2(x + self.drop_path(ffn)), ffn


def block_with_ffn(block: nn.Module, x: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(output, FFN output before its residual) of a :class:`PostNormBlock` or of timm's pre-norm ``Block``
    (``x + ls1(attn(norm1(x)))``, then ``ffn = mlp(norm2(x))``, output ``x + ls2(ffn)``)."""
    if isinstance(block, PostNormBlock):
        return block.forward_with_ffn(x, attn_mask)
    if isinstance(block, Block):
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask)))
        ffn = block.mlp(block.norm2(x))
        return x + block.drop_path2(block.ls2(ffn)), ffn
    raise TypeError(f"cannot read the FFN output of a {type(block).__name__} block (PostNormBlock or timm's Block)")
