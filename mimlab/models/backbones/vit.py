"""Mask-aware Vision Transformer (the MAE encoder) built from timm blocks.

Masked patches are *dropped* before the transformer blocks (MAE): only the visible tokens are computed.
Mask convention: ``mask[n, l] = 1`` means patch (or mask unit) ``l`` is removed, ``0`` visible; a mask on a
coarser unit grid (e.g. 32-px units on a 16-px patch grid) is upsampled to the patch grid. A
:class:`~mimlab.masking.MaskSet` with ``clones = M`` encodes every image M times, once per mask row (data2vec 2.0).

Layouts: pre-norm blocks + final norm (MAE, I-JEPA; timm ``Block``), or ``post_norm`` (data2vec 2.0: LayerNorm on the
embeddings, post-LN blocks, no final norm); with or without a cls token (I-JEPA has none).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, PatchEmbed
from torch import Tensor, nn

from mimlab.masking import MaskSet, as_mask_set, keep_indices, mask_to_token_grid, num_visible, repeat_clones
from mimlab.models.layers.post_norm_block import PostNormBlock
from mimlab.models.pos_embed import sincos_2d_pos_embed


@dataclass
class ViTEncoding:
    """Output of :meth:`MaskedViT.forward`.

    tokens: (N, P+K, D) final-normed prefix (cls, P = 1; P = 0 without a cls token) + visible tokens (K visible
    patches, ascending spatial order); N is the number of mask rows (images × clones).
    mask: (N, L) patch-grid mask, 1 = masked.  ids_restore: (N, L) unshuffle indices for [visible, masked] order.
    hidden_states: per-block outputs (N, P+K, D) before the final norm, when ``keep_hidden_states``.
    grid: (gh, gw) patch grid.  num_prefix_tokens: P.
    """

    tokens: Tensor
    mask: Tensor
    ids_restore: Tensor
    grid: tuple[int, int]
    hidden_states: list[Tensor] = field(default_factory=list)
    num_prefix_tokens: int = 1


class MaskedViT(nn.Module):
    """ViT encoder with MAE masking: cls token, fixed 2-D sin-cos pos-embed (zero cls row), pre-norm timm blocks.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: ViT geometry (ViT-B/16: 224, 16, 3, 768, 12, 12, 4).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        keep_hidden_states: also return every block's output (multi-block targets, Img2Vec).
        learnable_pos_embed: make the pos-embed trainable (fine-tuning); it is always *initialised* to sin-cos.
        class_token: prepend a cls token (False for I-JEPA; the pos-embed then has no cls row).
        post_norm: data2vec 2.0 layout: LayerNorm on the embeddings (``norm_pre``), post-LN blocks, no final norm.
        init_std: std of a truncated-normal init of every Linear weight (I-JEPA, data2vec 2.0: 0.02);
            None = MAE's xavier-uniform.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        keep_hidden_states: bool = False,
        learnable_pos_embed: bool = False,
        class_token: bool = True,
        post_norm: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.keep_hidden_states = keep_hidden_states
        self.num_prefix_tokens = int(class_token)
        self.init_std = init_std
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid = self.patch_embed.grid_size
        num_patches = self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim),
                                      requires_grad=learnable_pos_embed)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        block = PostNormBlock if post_norm else partial(Block, qkv_bias=True)
        self.blocks = nn.ModuleList(
            block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i], norm_layer=norm_layer) for i in range(depth)
        )
        self.norm_pre = norm_layer(embed_dim) if post_norm else nn.Identity()
        self.norm = nn.Identity() if post_norm else norm_layer(embed_dim)
        self.out_channels = [embed_dim]
        self.out_strides = [patch_size]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE init: sin-cos pos-embed, xavier-uniform Linear and patch-embed, normal(0.02) cls token
        (Linear weights truncated-normal(``init_std``) instead when it is set)."""
        self.pos_embed.data.copy_(
            sincos_2d_pos_embed(self.embed_dim, self.grid, cls_token=self.cls_token is not None).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        init = _init_linear_and_norm if self.init_std is None else partial(_init_trunc_normal, std=self.init_std)
        for module in (self.blocks, self.norm_pre, self.norm):
            module.apply(init)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} if self.cls_token is not None else {"pos_embed"}

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch-embed and add the patch pos-embed: (N, C, H, W) -> (N, L, D), grid."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.patch_embed(x)
        pos = self.pos_embed
        if grid != tuple(self.grid):
            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=self.num_prefix_tokens)
        return tokens + pos[:, self.num_prefix_tokens:], grid

    def _prepend_cls(self, tokens: Tensor) -> Tensor:
        if self.cls_token is None:
            return tokens
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def _run_blocks(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        hidden = []
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
            if self.keep_hidden_states:
                hidden.append(x)
        return self.norm(x), hidden

    def forward(self, x: Tensor, mask: Tensor | MaskSet | None = None) -> ViTEncoding:
        """Encode the visible patches of ``x`` (N, C, H, W) given ``mask`` (N·M, L_units), 1 = masked (a
        ``MaskSet`` with M clones repeats each image's embedded patches M times; a plain mask has M = 1).

        The mask may live on the host (as in pre-training): its visible count is read there, without a device sync,
        and it is then moved to the device of ``x``."""
        tokens, grid = self._embed(x)
        if mask is None:
            mask = torch.zeros(tokens.shape[0], tokens.shape[1], device=x.device)
        masks = as_mask_set(mask)
        tokens = repeat_clones(tokens, masks.clones)
        n, length, dim = tokens.shape
        mask = mask_to_token_grid(masks.mask, grid)
        num_keep = num_visible(mask)  # counted before the move: a host-side mask costs no device sync
        mask = mask.to(device=tokens.device, dtype=tokens.dtype)
        ids_shuffle = torch.argsort(mask, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = keep_indices(mask, num_keep)
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        out, hidden = self._run_blocks(self._prepend_cls(visible))
        return ViTEncoding(tokens=out, mask=mask, ids_restore=ids_restore, grid=grid, hidden_states=hidden,
                           num_prefix_tokens=self.num_prefix_tokens)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Unmasked encoding: (N, C, H, W) -> (N, P+L, D) final-normed tokens (cls first when there is one, P = 1)."""
        tokens, _ = self._embed(x)
        out, _ = self._run_blocks(self._prepend_cls(tokens))
        return out

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Backbone contract: one map (N, D, H/p, W/p) at stride ``patch_size`` (masked patches zeroed if a mask is given)."""
        if mask is None:
            tokens = self.forward_tokens(x)[:, self.num_prefix_tokens:]
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        else:
            enc = self.forward(x, mask)
            grid = enc.grid
            visible = enc.tokens[:, self.num_prefix_tokens:]
            full = torch.cat([visible, visible.new_zeros(visible.shape[0], enc.mask.shape[1] - visible.shape[1], visible.shape[2])], 1)
            tokens = torch.gather(full, 1, enc.ids_restore.unsqueeze(-1).expand(-1, -1, full.shape[2]))
        n, _, d = tokens.shape
        return [tokens.transpose(1, 2).reshape(n, d, grid[0], grid[1])]


def _init_trunc_normal(m: nn.Module, std: float) -> None:
    """I-JEPA / data2vec 2.0 init: truncated-normal(std) Linear weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
