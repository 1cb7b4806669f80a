"""Mask-aware Vision Transformer (the MAE encoder) built from timm blocks.

Masked patches are *dropped* before the transformer blocks (MAE): only the visible tokens are computed.
Mask convention: ``mask[n, l] = 1`` means patch (or mask unit) ``l`` is removed, ``0`` visible; a mask on a
coarser unit grid (e.g. 32-px units on a 16-px patch grid) is upsampled to the patch grid. A
:class:`~mimlab.masking.MaskSet` with ``clones = M`` encodes every image M times, once per mask row (data2vec 2.0).

Layouts: pre-norm blocks + final norm (MAE, I-JEPA without cls token), or ``post_norm`` (data2vec 2.0: LayerNorm on
the embeddings, post-LN blocks, no final norm). The BEiT-style variant (SimMIM's ViT, Bao et al. arXiv 2106.08254) is the same class with timm's ``EvaBlock``
(q/v biases, layer scale ``gamma_1``/``gamma_2``) as ``block``, ``abs_pos_embed=False`` and ``rel_pos_bias=True``
(one relative position bias table shared by all blocks, timm's ``beit.RelativePositionBias``, added to the
attention logits through the blocks' ``attn_mask``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.beit import RelativePositionBias
from timm.models.vision_transformer import Block, PatchEmbed
from torch import Tensor, nn

from mimlab.masking import MaskSet, as_mask_set, keep_indices, mask_to_token_grid, num_visible, repeat_clones
from mimlab.models.backbones.contract import (
    BackboneDefaults,
    Encoding,
    LayerGroups,
    TimmEquivalent,
    check_pool,
    hidden_blocks,
    resolve_rule,
)
from mimlab.models.layers.post_norm_block import PostNormBlock, block_with_ffn
from mimlab.models.pos_embed import sincos_2d_pos_embed

_norm_layer = partial(nn.LayerNorm, eps=1e-6)


class MaskedViT(BackboneDefaults, nn.Module):
    """ViT encoder with MAE masking: cls token, fixed 2-D sin-cos pos-embed (zero cls row), pre-norm timm blocks.

    Backbone contract (``mimlab.models.backbones.contract``): one map at stride ``patch_size`` with ``embed_dim``
    channels; pooled features "avg" (mean of the patch tokens) and "cls"; layer-decay rule "mae" (MAE
    ``util/lr_decay.py`` ``param_groups_lrd``, from BEiT; SimMIM's ViT rule is the same); no weight decay on
    ``pos_embed`` and ``cls_token``.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: ViT geometry (ViT-B/16: 224, 16, 3, 768, 12, 12, 4).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        keep_hidden: block indices (or "all") whose outputs the encoding returns in ``hidden``; a decoder that reads
            them asks at build time (:meth:`request_hidden`). ``keep_hidden_states=True`` (configs of older
            checkpoints) means "all".
        learnable_pos_embed: make the pos-embed trainable (fine-tuning); it is always *initialised* to sin-cos.
        abs_pos_embed: add an absolute pos-embed at all (False for BEiT/SimMIM, which use ``rel_pos_bias`` instead).
        rel_pos_bias: one relative position bias table ``(heads, 1+L, 1+L)`` shared by every block (BEiT "shared rel pos").
        block: builds one block from ``dim, num_heads, mlp_ratio, drop_path, norm_layer`` (default timm ``Block`` with
            qkv bias; timm ``EvaBlock(qkv_fused=True, init_values=0.1)`` is BEiT's block). Blocks take ``attn_mask``.
        weight_init: ``f(vit)`` initialising the weights; default :meth:`reset_parameters` (MAE), :func:`beit_init` (SimMIM),
            :func:`trunc_normal_init` (I-JEPA, data2vec 2.0).
        class_token: prepend a cls token (False for I-JEPA; the pos-embed then has no cls row).
        post_norm: data2vec 2.0 layout: LayerNorm on the embeddings (``norm_pre``), post-LN blocks
            (:class:`~mimlab.models.layers.post_norm_block.PostNormBlock` unless ``block`` is given), no final norm.
        global_pool: the readout evaluations and exports use by default, "avg" (the mean of the final-normed patch
            tokens) or "cls" (backbone contract). "avg" for every method here: no pre-training loss reaches the cls
            output directly (MAE's decoder drops it, SimMIM's and MaskFeat's heads read patches only, data2vec 2.0
            weights it 0.01, I-JEPA has none), and at short schedules it is the stronger feature (docs/methods.md);
            MAE's paper linear probe reads "cls" (``linprobe_mae_vit_b`` asks for it).
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
        keep_hidden: Sequence[int] | Literal["all"] = (),
        keep_hidden_states: bool = False,
        learnable_pos_embed: bool = False,
        abs_pos_embed: bool = True,
        rel_pos_bias: bool = False,
        block: Callable[..., nn.Module] | None = None,
        weight_init: Callable[[nn.Module], None] | None = None,
        class_token: bool = True,
        post_norm: bool = False,
        global_pool: Literal["cls", "avg"] = "avg",
    ) -> None:
        super().__init__()
        if rel_pos_bias and not class_token:
            raise ValueError("model.backbone.rel_pos_bias needs the cls token (class_token=true)")
        if global_pool == "cls" and not class_token:
            raise ValueError("model.backbone.global_pool=cls needs the cls token (class_token=true); use avg")
        self.img_size, self.in_chans, self.patch_size = img_size, in_chans, patch_size
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.keep_hidden = hidden_blocks("all" if keep_hidden_states else keep_hidden, depth)
        self.num_prefix_tokens = int(class_token)
        if not class_token:  # no cls token to pool
            self.feature_pools = ("avg",)
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid = self.patch_embed.grid_size
        num_patches = self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = (
            nn.Parameter(
                torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim), requires_grad=learnable_pos_embed
            )
            if abs_pos_embed
            else None
        )
        self.rel_pos_bias = RelativePositionBias(tuple(self.grid), num_heads) if rel_pos_bias else None
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        block = block or (PostNormBlock if post_norm else partial(Block, qkv_bias=True))
        self.layer_scale_init = getattr(block, "keywords", {}).get("init_values") or 1.0  # BEiT layer scale start
        self.blocks = nn.ModuleList(
            self._make_block(
                i,
                block,
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                drop_path=dpr[i],
                norm_layer=_norm_layer,
            )
            for i in range(depth)
        )
        self.norm_pre = _norm_layer(embed_dim) if post_norm else nn.Identity()
        self.norm = nn.Identity() if post_norm else _norm_layer(embed_dim)
        self.out_channels = [embed_dim]
        self.out_strides = [patch_size]
        self.num_features = embed_dim
        weight_init(self) if weight_init is not None else self.reset_parameters()

    def _make_block(self, index: int, block: Callable[..., nn.Module], **kwargs) -> nn.Module:
        """Block ``index`` of the encoder, built by the ``block`` factory from ``dim, num_heads, mlp_ratio, drop_path,
        norm_layer`` (a subclass may build some blocks differently, e.g. windowed attention)."""
        return block(**kwargs)

    def reset_parameters(self) -> None:
        """MAE init: sin-cos pos-embed, xavier-uniform Linear and patch-embed, normal(0.02) cls token (the relative
        position bias table starts at zero, layer scales at the block's ``init_values``)."""
        if self.pos_embed is not None:
            self.pos_embed.data.copy_(
                sincos_2d_pos_embed(self.embed_dim, self.grid, cls_token=self.cls_token is not None).unsqueeze(0)
            )
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        for module in (self.blocks, self.norm_pre, self.norm):
            module.apply(_init_linear_and_norm)

    # ----------------------------------------------------------------------------------------------- contract
    feature_pools: tuple[str, ...] = ("avg", "cls")
    layer_decay_rules = ("mae",)
    layer_decay_rule = "mae"

    def drop_final_norm(self) -> tuple[str, ...]:
        """MAE global-pool fine-tuning: the final LayerNorm becomes Identity (the head's fc_norm follows the pooling);
        a post-norm ViT has none to drop."""
        if not isinstance(self.norm, nn.LayerNorm):
            return ()
        self.norm = nn.Identity()
        return ("norm.*",)

    def request_hidden(self, blocks: Sequence[int] | Literal["all"]) -> None:
        """Also return the outputs of ``blocks`` (indices or "all") in ``Encoding.hidden`` (see ``keep_hidden``)."""
        self.keep_hidden = hidden_blocks(blocks, len(self.blocks), self.keep_hidden)

    def no_weight_decay(self) -> set[str]:
        """``pos_embed`` and ``cls_token`` (MAE's and SimMIM's ViT; SimMIM's mask token and relative bias do decay)."""
        return {n for n, _ in self.named_parameters() if n in ("pos_embed", "cls_token")}

    def layer_groups(self, rule: str | None = None) -> LayerGroups:
        """MAE ``param_groups_lrd`` (= SimMIM's ``get_vit_layer``, from BEiT): ``cls_token``/``mask_token``/``pos_embed``/
        ``patch_embed.*`` (and a post-norm ViT's ``norm_pre``, which acts on the embeddings) -> 0, ``blocks.i.*`` -> i+1, everything else (final norm, shared ``rel_pos_bias``) ->
        ``num_layers = depth + 1`` (scale 1)."""
        top = len(self.blocks) + 1

        def layer_id(name: str) -> int:
            root = name.split(".")[0]
            if root in ("cls_token", "mask_token", "pos_embed", "patch_embed", "norm_pre"):
                return 0
            return int(name.split(".")[1]) + 1 if root == "blocks" else top

        return LayerGroups.from_rule(self, resolve_rule(self, rule), layer_id, top)

    def forward_pooled(self, x: Tensor, pool: str | None = None) -> Tensor:
        """(N, C, H, W) -> (N, embed_dim): "avg" = mean of the patch tokens (MAE global pool; after ``norm``, which
        fine-tuning replaces by Identity), "cls" = the final-normed cls token (MAE linear probe)."""
        pool = check_pool(self, pool)
        tokens = self.forward_tokens(x)
        return tokens[:, 0] if pool == "cls" else tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def to_timm(self, head: dict[str, Tensor] | None = None) -> TimmEquivalent | None:
        """timm's ``VisionTransformer`` (``Beit`` for the BEiT layout: shared relative position bias, layer scale)
        with this encoder's weights and readout (``global_pool`` "token" or "avg" on the final-normed tokens), or
        with a fine-tuning head (``fc_norm.*``, ``fc.*``: the encoder's final norm is then Identity, timm's
        ``global_pool="avg"`` + ``fc_norm``). None for the post-norm layout (data2vec 2.0), which timm does not build."""
        if isinstance(self.norm_pre, nn.LayerNorm) or type(self)._make_block is not MaskedViT._make_block:
            return None
        state = {k: v for k, v in self.state_dict().items() if k != "mask_token"}
        dim, depth = self.embed_dim, len(self.blocks)
        kwargs: dict[str, Any] = dict(
            img_size=self.grid[0] * self.patch_size,
            patch_size=self.patch_size,
            embed_dim=dim,
            depth=depth,
            num_heads=self.blocks[0].attn.num_heads,  # type: ignore[union-attr]
            mlp_ratio=self.blocks[0].mlp.fc1.out_features / dim,  # type: ignore[union-attr, operator]
            num_classes=0,
            global_pool="token" if self.global_pool == "cls" else "avg",
        )
        if self.rel_pos_bias is not None:
            name = "beit_base_patch16_224"
            gamma = getattr(self.blocks[0], "gamma_1", None)
            kwargs.update(
                use_abs_pos_emb=self.pos_embed is not None,
                use_rel_pos_bias=False,
                use_shared_rel_pos_bias=True,
                init_values=None if gamma is None else self.layer_scale_init,  # timm's random init starts there too
                use_fc_norm=False,
            )
        else:
            name = "vit_base_patch16_224"
            kwargs.update(class_token=self.cls_token is not None)
            if kwargs["global_pool"] == "avg":  # the mean of the final-normed tokens, not timm's default fc_norm
                kwargs["fc_norm"] = False
        reference: Callable[[Tensor], Tensor] = partial(self.forward_pooled, pool=self.global_pool)
        if head:
            if not isinstance(self.norm, nn.Identity):
                raise ValueError("a fine-tuning head goes with the encoder whose final norm fine-tuning dropped")
            state.pop("norm.weight", None), state.pop("norm.bias", None)
            state.update({"fc_norm.weight": head["fc_norm.weight"], "fc_norm.bias": head["fc_norm.bias"]})
            state.update({"head.weight": head["fc.weight"], "head.bias": head["fc.bias"]})
            kwargs.update(num_classes=int(head["fc.weight"].shape[0]), global_pool="avg")
            kwargs.pop("fc_norm", None), kwargs.pop("use_fc_norm", None)
            norm = nn.LayerNorm(dim, eps=1e-6)
            norm.load_state_dict({"weight": head["fc_norm.weight"], "bias": head["fc_norm.bias"]})
            reference = _then(partial(self.forward_pooled, pool="avg"), norm)
        return TimmEquivalent(_registered_name(name, kwargs, state), kwargs, state, reference)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch-embed and add the patch pos-embed: (N, C, H, W) -> (N, L, D), grid."""
        tokens, grid = self._patch_tokens(x)
        return self._add_pos_embed(tokens, grid), grid

    def _patch_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(N, C, H, W) -> patch embeddings (N, L, D) without position, and the (gh, gw) grid."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if self.rel_pos_bias is not None and grid != tuple(self.grid):
            raise ValueError(
                f"image {tuple(x.shape[-2:])} gives a {grid} patch grid but the relative position bias "
                f"was built for {tuple(self.grid)}; set model.backbone.img_size to the image size"
            )
        return self.patch_embed(x), grid

    def _add_pos_embed(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.pos_embed is None:
            return tokens
        pos = self.pos_embed
        if grid != tuple(self.grid):
            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=self.num_prefix_tokens)
        return tokens + pos[:, self.num_prefix_tokens :]

    def _prepend_cls(self, tokens: Tensor) -> Tensor:
        if self.cls_token is None:
            return tokens
        cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1]
        return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def _attn_bias(self, x: Tensor, keep: Tensor | None = None) -> Tensor | None:
        """The shared relative position bias as an additive attention mask: (1, heads, 1+L, 1+L), or (N, heads, 1+K, 1+K)
        for the kept patches ``keep`` (N, K) (cls first); None without ``rel_pos_bias``."""
        if self.rel_pos_bias is None:
            return None
        bias = self.rel_pos_bias()
        if keep is None:
            bias = bias.unsqueeze(0)
        else:
            idx = torch.cat([keep.new_zeros(keep.shape[0], 1), keep + 1], dim=1)
            bias = bias[:, idx[:, :, None], idx[:, None, :]].transpose(0, 1)
        device = x.device.type  # under autocast the attention logits are in the autocast dtype: the mask must match
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            return bias.to(torch.get_autocast_dtype(device))
        return bias.to(x.dtype)

    def _run_blocks(
        self, x: Tensor, attn_bias: Tensor | None = None, keep: Sequence[int] = ()
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Blocks then the final norm on (N, P+K, D); also the outputs of blocks ``keep`` (before the norm)."""
        hidden = {}
        x = self.norm_pre(x)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask=attn_bias)
            if i in keep:
                hidden[i] = x
        return self.norm(x), hidden

    def forward(self, x: Tensor, mask: Tensor | MaskSet | None = None) -> Encoding:
        """Encode the visible patches of ``x`` (N, C, H, W) given ``mask`` (N·M, L_units), 1 = masked (a
        ``MaskSet`` with M clones repeats each image's embedded patches M times; a plain mask has M = 1).

        The visible count comes from the ``MaskSet`` (``visible``, stated by the generator), else from the mask; the mask
        may live on the host and is moved to the device of ``x``."""
        return self._encode(x, mask, self.keep_hidden)

    def forward_intermediates(
        self, x: Tensor, indices: Sequence[int] | str, mask: Tensor | MaskSet | None = None
    ) -> list[Tensor]:
        """The outputs (N, P+K, D) of blocks ``indices`` (ints, negative from the end, or "all"; ascending), before the
        final norm, for the patches ``mask`` (1 = masked) leaves in (all of them without a mask)."""
        keep = hidden_blocks(indices, len(self.blocks))
        return list(self._encode(x, mask, keep).hidden.values())

    def _encode(self, x: Tensor, mask: Tensor | MaskSet | None, keep: Sequence[int]) -> Encoding:
        tokens, grid = self._embed(x)
        if mask is None:
            mask = torch.zeros(tokens.shape[0], tokens.shape[1], device=x.device)
        masks = as_mask_set(mask)
        tokens = repeat_clones(tokens, masks.clones)
        n, length, dim = tokens.shape
        mask = mask_to_token_grid(masks.mask, grid)
        num_keep = num_visible(mask, masks.visible, masks.mask.shape[1])  # stated by the generator: no device read
        mask = mask.to(device=tokens.device, dtype=tokens.dtype)
        ids_shuffle = torch.argsort(mask, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = keep_indices(mask, num_keep)
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        out, hidden = self._run_blocks(self._prepend_cls(visible), self._attn_bias(visible, ids_keep), keep)
        return Encoding(
            tokens=out,
            mask=mask,
            grid=grid,
            ids_keep=ids_keep,
            ids_restore=ids_restore,
            num_prefix_tokens=self.num_prefix_tokens,
            hidden=hidden,
        )

    def forward_ffn_outputs(self, x: Tensor, last: int) -> list[Tensor]:
        """Unmasked encoding of (N, C, H, W); the FFN outputs before their residual of the last ``last`` blocks, each
        (N, L, D) without prefix tokens (data2vec 2.0's targets). No hooks, so a compiled step stays one graph."""
        tokens, _ = self._embed(x)
        bias = self._attn_bias(tokens)
        h = self.norm_pre(self._prepend_cls(tokens))
        first, outputs = len(self.blocks) - last, []
        for i, block in enumerate(self.blocks):
            if i < first:
                h = block(h, attn_mask=bias)
            else:
                h, ffn = block_with_ffn(block, h, bias)
                outputs.append(ffn[:, self.num_prefix_tokens :])
        return outputs

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Unmasked encoding: (N, C, H, W) -> (N, P+L, D) final-normed tokens (cls first when there is one, P = 1)."""
        tokens, _ = self._embed(x)
        out, _ = self._run_blocks(self._prepend_cls(tokens), self._attn_bias(tokens))
        return out

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Backbone contract: one map (N, D, H/p, W/p) at stride ``patch_size`` (masked patches zeroed if a mask is given)."""
        if mask is None:
            tokens = self.forward_tokens(x)[:, self.num_prefix_tokens :]
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        else:
            enc = self.forward(x, mask)
            grid = enc.grid
            visible = enc.tokens[:, self.num_prefix_tokens :]
            full = torch.cat(
                [
                    visible,
                    visible.new_zeros(visible.shape[0], enc.restore.shape[1] - visible.shape[1], visible.shape[2]),
                ],
                1,
            )
            tokens = torch.gather(full, 1, enc.restore.unsqueeze(-1).expand(-1, -1, full.shape[2]))
        n, _, d = tokens.shape
        return [tokens.transpose(1, 2).reshape(n, d, grid[0], grid[1])]


def _then(first: Callable[[Tensor], Tensor], second: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda x: second(first(x))


def _registered_name(base: str, kwargs: dict[str, Any], state: dict[str, Tensor]) -> str:
    """timm's own name for this exact architecture (``vit_small_patch16_224``: then only the head arguments
    ``num_classes``, ``global_pool`` and ``fc_norm`` stay in ``kwargs``, which is edited in place), else ``base`` with
    every architecture argument."""
    if base.startswith("vit") and kwargs["class_token"]:
        registered = set(timm.list_models("vit_*"))
        for size in ("tiny", "small", "base", "large", "huge", "giant"):
            name = f"vit_{size}_patch{kwargs['patch_size']}_{kwargs['img_size']}"
            if name not in registered:
                continue
            short: dict[str, Any] = {k: kwargs[k] for k in ("num_classes", "global_pool", "fc_norm") if k in kwargs}
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **short)
            own = model.state_dict()
            if (
                own.keys() == state.keys()
                and all(own[k].shape == v.shape for k, v in state.items())
                and model.blocks[0].attn.num_heads == kwargs["num_heads"]  # type: ignore[index, union-attr]
            ):
                kwargs.clear()
                kwargs.update(short)
                return name
    return base


@torch.no_grad()
def beit_init(vit: MaskedViT, std: float = 0.02) -> None:
    """BEiT / SimMIM init (microsoft/SimMIM ``models/vision_transformer.py``, ``VisionTransformerForSimMIM``):
    truncated-normal(0, std) cut at ±std for the cls token, a learnable pos-embed, Linear and patch-embed weights; zero
    biases; unit LayerNorms; then block i's ``attn.proj`` and ``mlp.fc2`` weights divided by sqrt(2 (i + 1)).
    A fixed (non-learnable) pos-embed keeps its sin-cos values; relative bias tables start at zero, layer scales at
    the blocks' ``init_values``."""
    trunc = partial(nn.init.trunc_normal_, std=std, a=-std, b=std)
    if vit.pos_embed is not None and vit.pos_embed.requires_grad:
        trunc(vit.pos_embed)
    elif vit.pos_embed is not None:
        vit.pos_embed.copy_(sincos_2d_pos_embed(vit.embed_dim, vit.grid, cls_token=True).unsqueeze(0))
    trunc(vit.cls_token)  # type: ignore[arg-type]
    for m in vit.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for i, blk in enumerate(vit.blocks):
        blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))  # type: ignore[operator, union-attr]
        blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))  # type: ignore[operator, union-attr]


@torch.no_grad()
def trunc_normal_init(vit: MaskedViT, std: float = 0.02) -> None:
    """I-JEPA (facebookresearch/ijepa ``src/helper.py`` ``init_model``) / data2vec 2.0 (fairseq ``init_bert_params``)
    init: :meth:`MaskedViT.reset_parameters`, then truncated-normal(0, std) Linear weights, zero biases, unit norms."""
    vit.reset_parameters()
    for module in (vit.blocks, vit.norm_pre, vit.norm):
        module.apply(partial(_init_trunc_normal, std=std))


def _init_trunc_normal(m: nn.Module, std: float) -> None:
    """Truncated-normal(std) Linear weights (cut at ±2, i.e. 100 σ for std 0.02), zero biases, LayerNorm 1 / 0."""
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
