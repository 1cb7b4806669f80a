"""HiViT backbone (Zhang et al., ICLR'23) as used by iTPN, with MAE-style dropping of masked 16-px mask units.

Layout (docs/methods.md §4.1). An image is cut into 16×16-px *mask units* (grid ``gh × gw``, ``L = gh·gw``). Every unit is
embedded as 4×4 inner tokens of 4 px, so the whole early network runs **per unit**:

    patch_embed  (N, L, 4, 4, D/4)   Conv2d(3, D/4, k=4, s=4) + LN
    stage4       C-MLP blocks (MLP only, no attention) at D/4, mlp ratio 3     -> f4  (N, K, 4, 4, D/4)  stride 4
    merge4       PatchMerge (2×2 concat, LN(4C), Linear(4C→2C, no bias))
    stage8       C-MLP blocks at D/2                                           -> f8  (N, K, 2, 2, D/2)  stride 8
    merge8       PatchMerge
    main_blocks  pre-norm transformer blocks at D with global attention        -> x16 (N, K, D)          stride 16

Masked units (``mask = 1``) are gathered away **before** ``stage4`` (only the ``K`` visible units are computed), or,
with ``drop_masked=False`` (BEiT-style, iTPN-CLIP), replaced by a learned ``mask_token`` at the input of the main stage.
The absolute position embedding is a trainable (1, L, D) Parameter initialised to fixed 2-D sin-cos (no cls row) and
added at the start of the main stage. The relative position bias (one ``(2g-1)²×heads`` table per main block) is off
for pre-training and on for fine-tuning (``rpe``).

Module names follow the official code so that ``mimlab.checkpoints.itpn`` can map official keys one-to-one, except
that the official flat ``blocks`` list (PatchMerge at list indices) is split into ``stage4/merge4/stage8/merge8/main_blocks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn

from mimlab.masking import MaskSet, fill_masked, keep_indices, num_visible
from mimlab.models.backbones.contract import (
    BackboneDefaults,
    Encoding,
    LayerGroups,
    check_pool,
    hidden_blocks,
    resolve_rule,
)
from mimlab.models.pos_embed import sincos_2d_pos_embed


def relative_position_index(grid: tuple[int, int]) -> Tensor:
    """(L, L) index into a ``(2gh-1)(2gw-1)`` bias table, Swin/BEiT convention (row offset major)."""
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)  # (2, L)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (L, L, 2)
    return (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)


def init_weights(m: nn.Module) -> None:
    """Official iTPN/HiViT init: Linear trunc-normal(0.02) with zero bias, LayerNorm weight 1 / bias 0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head self-attention (SDPA) with an optional relative position bias table.

    ``forward(x (N, K, D), rpe_index (N or 1, K, K) long | None) -> (N, K, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        rpe: bool,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.relative_position_bias_table = (
            nn.Parameter(torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1), num_heads)) if rpe else None
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, rpe_index: Tensor | None = None) -> Tensor:
        n, k, d = x.shape
        q, key, v = self.qkv(x).reshape(n, k, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = None
        if self.relative_position_bias_table is not None and rpe_index is not None:
            bias = self.relative_position_bias_table[rpe_index].permute(0, 3, 1, 2).to(q.dtype)  # (N|1, H, K, K)
        x = F.scaled_dot_product_attention(
            q, key, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(n, k, d)))


class HiViTBlock(nn.Module):
    """Pre-norm block. ``num_heads = 0`` gives a C-MLP block (``x + MLP(LN(x))`` only, any leading shape ``(..., C)``).

    ``init_values`` enables layer scale (``gamma_1``/``gamma_2``, iTPN-CLIP uses 0.1).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        grid: tuple[int, int],
        rpe: bool = False,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        with_attn = num_heads > 0
        self.norm1 = nn.LayerNorm(dim, eps=eps) if with_attn else None
        self.attn = Attention(dim, num_heads, grid, rpe, qkv_bias, attn_drop, drop) if with_attn else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        if init_values is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values))) if with_attn else None
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None  # type: ignore[assignment]

    def forward(self, x: Tensor, rpe_index: Tensor | None = None) -> Tensor:
        if self.attn is not None:
            y = self.attn(self.norm1(x), rpe_index)  # type: ignore[misc]
            x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class UnitPatchEmbed(nn.Module):
    """(N, 3, H, W) -> (N, L, r, r, C) with ``r = unit_size / 4`` inner tokens per unit, row-major units and tokens."""

    def __init__(self, in_chans: int, dim: int, unit_size: int = 16, inner: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        if unit_size % inner:
            raise ValueError(f"unit_size {unit_size} must be divisible by inner {inner}")
        self.unit_size, self.inner = unit_size, inner
        k = unit_size // inner
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=k, stride=k)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        if h % self.unit_size or w % self.unit_size:
            raise ValueError(f"image {h}x{w} is not divisible by the HiViT mask unit size {self.unit_size}")
        gh, gw, r = h // self.unit_size, w // self.unit_size, self.inner
        x = self.proj(x)  # (N, C, gh*r, gw*r)
        x = x.reshape(n, -1, gh, r, gw, r).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, r, r, -1)
        return self.norm(x)


class PatchMerge(nn.Module):
    """(N, K, 2s, 2s, C) -> (N, K, s, s, 2C): concat [x00, x10, x01, x11] of every 2×2, LN(4C), Linear(4C→2C, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


def units_to_map(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """(N, L, r, r, C) or (N, L, C) over a full ``grid`` -> dense (N, C, gh*r, gw*r)."""
    if x.dim() == 3:
        x = x[:, :, None, None, :]
    n, _, r, _, c = x.shape
    gh, gw = grid
    return x.reshape(n, gh, gw, r, r, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, gh * r, gw * r)


def map_to_units(x: Tensor, unit: int) -> Tensor:
    """Dense (N, C, H, W) -> (N, L, unit, unit, C) with ``L = (H/unit)(W/unit)``; inverse of ``units_to_map``."""
    n, c, h, w = x.shape
    gh, gw = h // unit, w // unit
    return x.reshape(n, c, gh, unit, gw, unit).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, unit, unit, c)


class HiViT(BackboneDefaults, nn.Module):
    """HiViT / iTPN backbone (see module docstring).

    Args:
        embed_dim: main-stage width D (stages run at D/4, D/2, D).
        mlp_depth: C-MLP blocks per early stage (iTPN convention: counts blocks; HiViT configs' ``depths[i]`` ×2).
        depth: main transformer blocks. num_heads: heads of the main blocks.
        img_size: training resolution; fixes the ape grid and the RPE tables.
        rpe: relative position bias (False for pre-training, True for fine-tuning).
        drop_masked: True drops masked units (MAE); False keeps them and inpaints ``mask_token`` (BEiT/iTPN-CLIP).
        keep_hidden: main-block indices (0-based, or "all") whose outputs are returned in ``Encoding.hidden``; a decoder
            that reads them asks at build time (:meth:`request_hidden`).
        num_classes: > 0 adds mean-pool + ``fc_norm`` + ``head`` (classification, ``forward_head``).
        layer_decay_rule: "itpn" (default; iTPN ``util/lr_decay.py``: decay renormalised by 13 / num_layers) or
            "hivit" (HiViT's copy of it, without the renormalisation), see :meth:`layer_groups`.
        pos_embed_interpolation: how the position table meets the tokens, see :meth:`position_embedding`:
            "table" (default) uses the table as is at its own grid; "itpn" reproduces the official
            ``interpolate_pos_encoding``, which also resamples at the table's own grid whenever units are dropped.

    Backbone contract: ``out_channels = [D/4, D/2, D]`` at ``out_strides = [4, 8, 16]``; pooled feature "avg"
    (mean of the main-stage tokens); no weight decay on ``absolute_pos_embed``, ``mask_token`` and the relative
    position bias tables (official iTPN fine-tuning).
    """

    feature_pools = ("avg",)
    global_pool = "avg"
    layer_decay_rules = ("itpn", "hivit")

    def __init__(
        self,
        embed_dim: int = 512,
        mlp_depth: int = 3,
        depth: int = 24,
        num_heads: int = 8,
        img_size: int = 224,
        unit_size: int = 16,
        in_chans: int = 3,
        stem_mlp_ratio: float = 3.0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ape: bool = True,
        rpe: bool = False,
        drop_masked: bool = True,
        init_values: float | None = None,
        keep_hidden: Sequence[int] | Literal["all"] = (),
        num_classes: int = 0,
        layer_decay_rule: str = "itpn",
        pos_embed_interpolation: str = "table",
    ) -> None:
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"HiViT embed_dim must be divisible by 4, got {embed_dim}")
        if pos_embed_interpolation not in ("table", "itpn"):
            raise ValueError(
                f"HiViT pos_embed_interpolation must be 'table' or 'itpn', got {pos_embed_interpolation!r}"
            )
        self.layer_decay_rule, self.pos_embed_interpolation = layer_decay_rule, pos_embed_interpolation
        self.embed_dim, self.depth, self.mlp_depth = embed_dim, depth, mlp_depth
        self.unit_size, self.drop_masked = unit_size, drop_masked
        self.img_size, self.in_chans, self.num_heads = img_size, in_chans, num_heads
        self.rpe, self.init_values = rpe, init_values
        self.keep_hidden = hidden_blocks(keep_hidden, depth)
        self.grid = (img_size // unit_size, img_size // unit_size)
        d4, d8 = embed_dim // 4, embed_dim // 2
        self.out_channels = [d4, d8, embed_dim]
        self.out_strides = [4, 8, 16]
        self.num_features = embed_dim
        n_blocks = 2 * mlp_depth + depth
        dpr = iter([drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)])  # linspace(0, rate)

        def block(dim: int, heads: int, ratio: float) -> HiViTBlock:
            return HiViTBlock(
                dim,
                heads,
                ratio,
                self.grid,
                rpe=rpe,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=next(dpr),
                init_values=init_values,
            )

        self.patch_embed = UnitPatchEmbed(in_chans, d4, unit_size)
        self.stage4 = nn.ModuleList([block(d4, 0, stem_mlp_ratio) for _ in range(mlp_depth)])
        self.merge4 = PatchMerge(d4)
        self.stage8 = nn.ModuleList([block(d8, 0, stem_mlp_ratio) for _ in range(mlp_depth)])
        self.merge8 = PatchMerge(d8)
        self.main_blocks = nn.ModuleList([block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.absolute_pos_embed = (
            nn.Parameter(sincos_2d_pos_embed(embed_dim, self.grid)[None]) if ape else None
        )  # trainable, sin-cos initialised, no cls row
        self.pos_drop = nn.Dropout(drop_rate)
        self.mask_token = None if drop_masked else nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("relative_position_index", relative_position_index(self.grid), persistent=False)
        self.num_classes = num_classes
        if num_classes > 0:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.head = nn.Linear(embed_dim, num_classes)
        self.apply(init_weights)
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)

    # ----------------------------------------------------------------------------------------------- contract
    def drop_final_norm(self) -> tuple[str, ...]:
        """Kept: iTPN fine-tuning pools the last stage into the head's fc_norm; HiViT has no final norm of its own."""
        return ()

    def request_hidden(self, blocks: Sequence[int] | Literal["all"]) -> None:
        """Also return the outputs of main blocks ``blocks`` (indices or "all") in ``Encoding.hidden``."""
        self.keep_hidden = hidden_blocks(blocks, len(self.main_blocks), self.keep_hidden)

    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if n.endswith(".relative_position_bias_table")}
        return names | {n for n in ("absolute_pos_embed", "mask_token") if getattr(self, n) is not None}

    def layer_groups(self, rule: str | None = None) -> LayerGroups:
        """iTPN / HiViT ``util/lr_decay.py`` layer ids (BEiT rule over the official flat ``blocks`` list).

        Only non-PatchMerge blocks count: ``num_layers = 2*mlp_depth + depth + 1`` (31 for iTPN-B); ``stage4.j`` ->
        j+1, ``merge4`` takes the id of the block before it, then ``stage8``, ``merge8``, ``main_blocks`` likewise;
        ``patch_embed``/``absolute_pos_embed`` -> 0; everything else (``mask_token``, ``fc_norm``, ``head``) ->
        ``num_layers``. "itpn" renormalises the decay as ``decay ** (13 / num_layers)``; "hivit" does not.
        """
        rule = resolve_rule(self, rule)
        m4, m8 = len(self.stage4), len(self.stage8)
        top = m4 + m8 + len(self.main_blocks) + 1
        offsets = {"stage4": 0, "stage8": m4, "main_blocks": m4 + m8}
        merges = {"merge4": m4, "merge8": m4 + m8}

        def layer_id(name: str) -> int:
            root = name.split(".")[0]
            if root in ("patch_embed", "absolute_pos_embed"):
                return 0
            if root in offsets:
                return offsets[root] + int(name.split(".")[1]) + 1
            return merges.get(root, top)

        return LayerGroups.from_rule(self, rule, layer_id, top, 13 / top if rule == "itpn" else 1.0)

    def forward_pooled(self, x: Tensor, pool: str | None = None) -> Tensor:
        """(N, 3, H, W) -> (N, D): mean of the main-stage tokens (iTPN fine-tuning's global pool, before fc_norm)."""
        pool = check_pool(self, pool)
        return self(x).tokens.mean(dim=1)

    def forward(self, x: Tensor, mask: Tensor | MaskSet | None = None) -> Encoding:
        """The masked encoding (:class:`~mimlab.models.backbones.contract.Encoding` with ``pyramid`` = (f4
        (N,K,4,4,D/4), f8 (N,K,2,2,D/2), x16 (N,K,D))) of (N, 3, H, W); ``mask`` (N, L) over 16-px units or a
        ``MaskSet`` stating its visible count, 1 = masked (None = full image)."""
        return self._encode(x, mask, self.keep_hidden)

    def forward_intermediates(
        self, x: Tensor, indices: Sequence[int] | str, mask: Tensor | MaskSet | None = None
    ) -> list[Tensor]:
        """The outputs (N, K, D) of main blocks ``indices`` (ints, negative from the end, or "all"; ascending) for the
        units ``mask`` (1 = masked) leaves in (all of them without a mask)."""
        keep = hidden_blocks(indices, len(self.main_blocks))
        return list(self._encode(x, mask, keep).hidden.values())

    def _encode(self, x: Tensor, mask: Tensor | MaskSet | None, keep: Sequence[int]) -> Encoding:
        stated = mask.visible if isinstance(mask, MaskSet) else None
        mask = mask.mask if isinstance(mask, MaskSet) else mask
        n, _, h, w = x.shape
        grid = (h // self.unit_size, w // self.unit_size)
        x = self.patch_embed(x)  # (N, L, 4, 4, D/4)
        ids_keep = None
        if mask is not None and mask.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"mask has {mask.shape[1]} units but the {h}x{w} image has {grid[0] * grid[1]} "
                f"units of {self.unit_size} px; set masking.unit_size={self.unit_size}"
            )
        if mask is not None:
            num_keep = num_visible(mask, stated)  # stated by the generator, else counted (a host mask: no sync)
            mask = mask.to(x.device)
        if mask is not None and self.drop_masked:
            ids_keep = keep_indices(mask, num_keep)
            x = torch.gather(x, 1, ids_keep[:, :, None, None, None].expand(-1, -1, *x.shape[2:]))
        for blk in self.stage4:
            x = blk(x)
        f4 = x
        x = self.merge4(x)
        for blk in self.stage8:
            x = blk(x)
        f8 = x
        x = self.merge8(x)[:, :, 0, 0, :]  # (N, K, D)
        if mask is not None and not self.drop_masked:
            x = fill_masked(x, mask, self.mask_token)  # type: ignore[arg-type]
        if self.absolute_pos_embed is not None:
            pos = self.position_embedding(grid, x.shape[1])
            if ids_keep is not None:
                pos = torch.gather(pos.expand(n, -1, -1), 1, ids_keep[:, :, None].expand(-1, -1, pos.shape[-1]))
            x = x + pos
        x = self.pos_drop(x)
        rpe_index = self._rpe_index(grid, ids_keep)
        hidden = {}
        for i, blk in enumerate(self.main_blocks):
            x = blk(x, rpe_index)
            if i in keep:
                hidden[i] = x
        return Encoding(x, mask, grid, ids_keep=ids_keep, pyramid=(f4, f8, x), hidden=hidden)

    def position_embedding(self, grid: tuple[int, int], num_tokens: int) -> Tensor:
        """The (1, gh*gw, D) position embedding for a ``grid`` of units of which ``num_tokens`` enter the main stage.

        "table": the table itself at its own grid, bicubically resized to any other grid. "itpn": the official
        ``interpolate_pos_encoding``, which returns the table only when ``num_tokens`` equals the table's length and
        the grid is square, and otherwise resamples it by ``scale_factor = (g + 0.1) / g_table`` (DINO's +0.1).
        As it compares the *visible* count, every masked pre-training step resamples the table even at its own
        grid (up to ~0.10 per entry on a 14x14 sin-cos table), while full images (fine-tuning, dense transfer)
        get the table unchanged.
        """
        pos, (th, tw) = self.absolute_pos_embed, self.grid
        if self.pos_embed_interpolation == "itpn":
            if num_tokens == th * tw and grid[0] == grid[1]:
                return pos  # type: ignore[return-value]
            scale = ((grid[0] + 0.1) / th, (grid[1] + 0.1) / tw)
            table = pos.reshape(1, th, tw, -1).permute(0, 3, 1, 2)  # type: ignore[union-attr]
            pos = F.interpolate(table, scale_factor=scale, mode="bicubic")  # type: ignore[assignment]
            return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)  # type: ignore[union-attr]
        if tuple(grid) == self.grid:
            return pos  # type: ignore[return-value]
        pos = pos.reshape(1, th, tw, -1).permute(0, 3, 1, 2)  # type: ignore[assignment, union-attr]
        pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)  # type: ignore[arg-type, assignment]
        return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)  # type: ignore[union-attr]

    def _rpe_index(self, grid: tuple[int, int], ids_keep: Tensor | None) -> Tensor | None:
        if not self.main_blocks or self.main_blocks[0].attn.relative_position_bias_table is None:  # type: ignore[union-attr]
            return None
        if tuple(grid) != self.grid:
            raise ValueError(
                f"rpe=True fixes the unit grid to {self.grid}; got {grid}. Use img_size matching the data."
            )
        idx = self.relative_position_index
        if ids_keep is None:
            return idx[None]  # type: ignore[index]
        return idx[ids_keep[:, :, None], ids_keep[:, None, :]]  # type: ignore[index]  # (N, K, K)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Dense maps ``[(N, D/4, H/4, W/4), (N, D/2, H/8, W/8), (N, D, H/16, W/16)]``; masked units are zero."""
        enc = self(x, mask)
        if enc.ids_keep is None:
            return [units_to_map(f, enc.grid) for f in enc.pyramid]
        out = []
        for f in enc.pyramid:
            full = f.new_zeros(f.shape[0], enc.grid[0] * enc.grid[1], *f.shape[2:])
            idx = enc.ids_keep.reshape(*enc.ids_keep.shape, *([1] * (f.dim() - 2))).expand_as(f)
            out.append(units_to_map(full.scatter(1, idx, f), enc.grid))
        return out

    def forward_head(self, x: Tensor) -> Tensor:
        """Classification: mean-pool of the main stage -> fc_norm -> head; (N, 3, H, W) -> (N, num_classes)."""
        if self.num_classes <= 0:
            raise ValueError("HiViT was built with num_classes=0; set model.backbone.num_classes for fine-tuning")
        return self.head(self.fc_norm(self.forward_pooled(x)))
