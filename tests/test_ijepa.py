"""I-JEPA: each part against an independent re-derivation of the official math (facebookresearch/ijepa
``src/masks/multiblock.py`` MaskCollator, ``src/models/vision_transformer.py`` VisionTransformer /
VisionTransformerPredictor, ``src/masks/utils.py`` apply_masks, ``src/train.py`` forward_target / loss_fn),
the context/target separation, the weight-decay schedule and the ViT-H/14 parameter counts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import SMALL_VIT, TINY_VIT, compose_config
from mimlab.callbacks.weight_decay_schedule import CosineWeightDecay
from mimlab.losses.multi_term import MaskedSmoothL1
from mimlab.masking import MaskSet
from mimlab.masking.multiblock import MultiBlockMasking
from mimlab.models.backbones.vit import MaskedViT, trunc_normal_init
from mimlab.models.heads.ijepa_predictor import IJEPAPredictor
from mimlab.targets.ijepa import IJEPATarget
from mimlab.tasks.pretrain import MaskedPretraining

D, HEADS = 32, 2


def tiny_encoder(seed: int) -> MaskedViT:
    torch.manual_seed(seed)
    vit = MaskedViT(
        img_size=64,
        patch_size=8,
        embed_dim=D,
        depth=2,
        num_heads=HEADS,
        class_token=False,
        weight_init=trunc_normal_init,
    )
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vit


def tiny_predictor(seed: int) -> IJEPAPredictor:
    torch.manual_seed(seed)
    return IJEPAPredictor(D, img_size=64, patch_size=8, predictor_dim=16, depth=2, num_heads=HEADS)


def tiny_masking() -> MultiBlockMasking:
    return MultiBlockMasking(min_keep=4, unit_size=8)


# ----------------------------------------------------------------------------------- references (official math)
def reference_mask_collator(batch, side, npred, pred_scale, aspect, enc_scale, min_keep, size_g, pos_g):
    """MaskCollator.__call__ with nenc=1, allow_overlap=False; sizes from ``size_g``, positions from ``pos_g``."""

    def block_size(scale, ar_scale):
        r = torch.rand(1, generator=size_g).item()
        max_keep = int(side * side * (scale[0] + r * (scale[1] - scale[0])))
        ar = ar_scale[0] + r * (ar_scale[1] - ar_scale[0])
        h, w = int(round(math.sqrt(max_keep * ar))), int(round(math.sqrt(max_keep / ar)))
        while h >= side:
            h -= 1
        while w >= side:
            w -= 1
        return h, w

    def sample(h, w, regions=None):
        tries, timeout = 0, 20
        while True:
            top = torch.randint(0, side - h, (1,), generator=pos_g)
            left = torch.randint(0, side - w, (1,), generator=pos_g)
            m = torch.zeros(side, side, dtype=torch.int32)
            m[top : top + h, left : left + w] = 1
            for k in range(max(len(regions or []) - tries, 0)):
                m *= regions[k]
            idx = torch.nonzero(m.flatten()).squeeze(1)
            if len(idx) > min_keep:
                break
            timeout -= 1
            if timeout == 0:
                tries, timeout = tries + 1, 20
        comp = torch.ones(side, side, dtype=torch.int32)
        comp[top : top + h, left : left + w] = 0
        return idx, comp

    p_size, e_size = block_size(pred_scale, aspect), block_size(enc_scale, (1.0, 1.0))
    preds, encs = [], []
    for _ in range(batch):
        drawn = [sample(*p_size) for _ in range(npred)]
        preds.append([m for m, _ in drawn])
        encs.append(sample(*e_size, [c for _, c in drawn])[0])
    k_p, k_e = min(len(m) for ms in preds for m in ms), min(len(m) for m in encs)
    return [torch.stack([m[:k_e] for m in encs])], [torch.stack([ms[i][:k_p] for ms in preds]) for i in range(npred)]


def apply_masks(x, masks):
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.shape[-1])) for m in masks], 0)


def layer_norm(x, norm=None, eps=1e-5):
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + (norm.eps if norm else eps)
    )
    return y * norm.weight + norm.bias if norm is not None else y


def reference_block(blk, x):
    """I-JEPA Block: pre-norm attention + MLP with residuals."""
    b, n, c = x.shape
    h = layer_norm(x, blk.norm1)
    q, k, v = (
        F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias)
        .reshape(b, n, 3, blk.attn.num_heads, -1)
        .permute(2, 0, 3, 1, 4)
    )
    a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
    x = x + F.linear((a @ v).transpose(1, 2).reshape(b, n, c), blk.attn.proj.weight, blk.attn.proj.bias)
    h = layer_norm(x, blk.norm2)
    return x + F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)


def reference_encoder(vit, images, masks=None):
    """VisionTransformer.forward: patch conv + sin-cos pos (no cls), apply_masks, blocks, norm."""
    pe = vit.patch_embed.proj
    x = F.conv2d(images, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2) + vit.pos_embed
    if masks is not None:
        x = apply_masks(x, masks)
    for blk in vit.blocks:
        x = reference_block(blk, x)
    return layer_norm(x, vit.norm)


def reference_predictor(pred, x, masks_x, masks):
    """VisionTransformerPredictor.forward (block-major output: target block i of every image, then block i + 1)."""
    batch = len(x) // len(masks_x)
    x = F.linear(x, pred.predictor_embed.weight, pred.predictor_embed.bias)
    pos = pred.predictor_pos_embed.repeat(batch, 1, 1)
    x = x + apply_masks(pos, masks_x)
    n_ctxt = x.shape[1]
    pos_embs = apply_masks(pos, masks)  # repeat_interleave_batch with one context mask is the identity
    tokens = pred.mask_token.repeat(pos_embs.shape[0], pos_embs.shape[1], 1) + pos_embs
    x = torch.cat([x.repeat(len(masks), 1, 1), tokens], 1)
    for blk in pred.predictor_blocks:
        x = reference_block(blk, x)
    x = layer_norm(x, pred.predictor_norm)[:, n_ctxt:]
    return F.linear(x, pred.predictor_proj.weight, pred.predictor_proj.bias)


def reference_step(encoder, predictor, target_encoder, images, masks_enc, masks_pred):
    """train.py: forward_target (layer_norm, apply_masks) + forward_context + F.smooth_l1_loss."""
    h = reference_encoder(target_encoder, images)
    h = apply_masks(F.layer_norm(h, (h.shape[-1],)), masks_pred)
    z = reference_predictor(predictor, reference_encoder(encoder, images, masks_enc), masks_enc, masks_pred)
    return z, h, F.smooth_l1_loss(z, h)


def official_layout(masks: MaskSet) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Our MaskSet -> (masks_enc, masks_pred) index lists as the official collator returns them."""
    context = (1 - masks.mask).nonzero()[:, 1].reshape(masks.mask.shape[0], -1)
    return [context], list(masks.targets.unbind(1))


# ----------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("side,seed", [(14, 0), (14, 1), (16, 2), (8, 3)])
def test_multiblock_masks_equal_official_collator(side, seed):
    min_keep = 10 if side > 8 else 4
    ours = MultiBlockMasking(min_keep=min_keep, unit_size=16)(8, (side, side), torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    enc, pred = reference_mask_collator(8, side, 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), min_keep, g, g)
    got_enc, got_pred = official_layout(ours)
    assert torch.equal(got_enc[0], enc[0])
    assert all(torch.equal(a, b) for a, b in zip(got_pred, pred, strict=True))


def test_multiblock_geometry_and_disjoint_context():
    masks = MultiBlockMasking()(16, (14, 14), torch.Generator().manual_seed(0))
    targets, context = masks.targets, masks.mask == 0
    assert targets.shape[:2] == (16, 4) and masks.clones == 1
    assert 0.15 * 196 * 0.8 <= targets.shape[2] <= 0.2 * 196 * 1.2  # one block size per batch
    assert (context.sum(1) == context[0].sum()).all() and context[0].sum() > 10
    in_target = torch.zeros_like(context)
    in_target.scatter_(1, targets.flatten(1), True)
    assert not (in_target & context).any()  # target blocks are cut out of the context
    rows, cols = targets // 14, targets % 14
    spans = (rows.amax(2) - rows.amin(2) + 1) * (cols.amax(2) - cols.amin(2) + 1)
    assert (spans == targets.shape[2]).all()  # every target is one full rectangle
    assert rows.max() < 13 and cols.max() < 13  # the official bounds never reach the last row / column


def test_multiblock_with_one_generator_per_image_keeps_one_block_size_per_batch():
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    masks = MultiBlockMasking().batch((14, 14), gens)
    assert masks.visible == int((1 - masks.mask[0]).sum())  # stated: the batch's smallest context
    assert masks.targets.shape[:2] == (6, 4) and (masks.mask.sum(1) == masks.mask[0].sum()).all()
    rows, cols = masks.targets // 14, masks.targets % 14
    spans = (rows.amax(2) - rows.amin(2) + 1) * (cols.amax(2) - cols.amin(2) + 1)
    assert (spans == masks.targets.shape[2]).all()  # whole rectangles of one size: sizes come from the first generator


def test_min_keep_larger_than_a_block_is_named():
    # on an 8x8 grid a target block (scale 0.15-0.2 of 64 units) has at most 12 units
    with pytest.raises(ValueError, match="masking.min_keep=12"):
        MultiBlockMasking(min_keep=12, unit_size=8)(2, (8, 8), torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------- encoder, predictor, target, loss
def test_context_encoder_equals_official_vit_on_context_patches():
    vit, images = tiny_encoder(0).eval(), torch.randn(3, 3, 64, 64)
    masks = tiny_masking()(3, (8, 8), torch.Generator().manual_seed(1))
    enc_masks, _ = official_layout(masks)
    torch.testing.assert_close(vit(images, masks).tokens, reference_encoder(vit, images, enc_masks), rtol=0, atol=2e-5)


def test_composed_step_equals_official_train_step():
    encoder, target_encoder, predictor = tiny_encoder(1), tiny_encoder(2), tiny_predictor(3)
    masking = tiny_masking()
    module = MaskedPretraining(
        encoder, predictor, IJEPATarget(target_encoder), MaskedSmoothL1(1.0, masked_only=False), masking, optim=None
    )
    images = torch.randn(4, 3, 64, 64)
    masks = module.make_mask(images, 4)
    pred, target = module(images, masks)
    loss = module.loss(pred, target, masks)["loss"]
    z, h, ref_loss = reference_step(encoder, predictor, target_encoder, images, *official_layout(masks))
    block_major = lambda t: t.transpose(0, 1).flatten(0, 1)  # (N, T, K, D) -> (T·N, K, D)
    torch.testing.assert_close(block_major(pred), z, rtol=0, atol=2e-5)
    torch.testing.assert_close(block_major(target), h, rtol=0, atol=2e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)


def test_prediction_never_sees_target_pixels():
    encoder, predictor = tiny_encoder(4).eval(), tiny_predictor(5)
    masks = tiny_masking()(2, (8, 8), torch.Generator().manual_seed(6))
    images = torch.randn(2, 3, 64, 64)
    changed = images.clone().reshape(2, 3, 8, 8, 8, 8)
    outside = masks.mask.reshape(2, 1, 8, 1, 8, 1).bool().expand_as(changed)
    changed[outside] = torch.randn(int(outside.sum()))  # every patch outside the context block
    before = predictor(encoder(images, masks), masks)
    after = predictor(encoder(changed.reshape(2, 3, 64, 64), masks), masks)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_target_is_the_layer_normed_teacher_at_target_blocks():
    teacher, images = tiny_encoder(7), torch.randn(2, 3, 64, 64)
    masks = tiny_masking()(2, (8, 8), torch.Generator().manual_seed(8))
    target = IJEPATarget(teacher)
    out = target(images, masks)
    h = F.layer_norm(reference_encoder(teacher, images), (D,))
    for t in range(4):
        torch.testing.assert_close(out[:, t], apply_masks(h, [masks.targets[:, t]]), rtol=0, atol=2e-5)
    assert target(images, torch.zeros(2, 64)).shape == (2, 64, D)  # no target blocks: every token (feature panels)
    with pytest.raises(TypeError, match="masking=multiblock"):
        tiny_predictor(0)(teacher(images), torch.zeros(2, 64))


def test_ema_momentum_is_linear_over_training():
    student, target = tiny_encoder(0), IJEPATarget(tiny_encoder(1))
    target.update(student, 0.0)
    for progress, expected in [(0.0, 0.996), (0.5, 0.998), (1.0, 1.0)]:
        target.update(student, progress)
        assert target.current_momentum == pytest.approx(expected)


def test_cosine_weight_decay_schedule_and_resume():
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.04}, {"params": params[1:], "weight_decay": 0.0}])
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=100, optimizers=[opt])
    callback = CosineWeightDecay(final=0.4)
    seen = []
    for step in (0, 50, 100):
        trainer.global_step = step
        callback.on_train_batch_start(trainer, None, None, 0)
        seen.append(opt.param_groups[0]["weight_decay"])
        assert opt.param_groups[1]["weight_decay"] == 0.0
    assert seen == pytest.approx([0.04, 0.22, 0.4])
    resumed = torch.optim.AdamW(
        [{"params": params[:1], "weight_decay": 0.04}, {"params": params[1:], "weight_decay": 0.0}]
    )
    resumed.load_state_dict(opt.state_dict())  # mid-schedule weight decay + its start value come back
    trainer.optimizers, trainer.global_step = [resumed], 75
    callback.on_train_batch_start(trainer, None, None, 0)
    assert resumed.param_groups[0]["weight_decay"] == pytest.approx(0.4 - 0.36 * 0.5 * (1 + math.cos(0.75 * math.pi)))


# ----------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "experiment,encoder,positions,predictor,predictor_positions",
    [
        ("ijepa_vit_h14", 630_762_240, 256 * 1280, 22_377_728, 256 * 384),
        ("ijepa_vit_b16", 85_797_120, 196 * 768, 21_960_960, 196 * 384),
    ],
)
def test_recipe_parameter_counts(experiment, encoder, positions, predictor, predictor_positions, tmp_path):
    """Analytic counts from the official modules: encoder = patch conv + fixed sin-cos table + 12D²+13D per block +
    final norm; predictor = embed + mask token + fixed table + 12d²+13d per block + norm + proj."""
    cfg = compose_config([f"experiment={experiment}", "logger=csv"], tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    count = lambda m, trainable=False: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)
    dim, depth, patch = cfg.model.backbone.embed_dim, cfg.model.backbone.depth, cfg.model.backbone.patch_size
    assert encoder == dim * 3 * patch * patch + dim + positions + depth * (12 * dim * dim + 13 * dim) + 2 * dim
    assert predictor == (dim * 384 + 384) + 384 + predictor_positions + 12 * (12 * 384**2 + 13 * 384) + 768 + (
        384 * dim + dim
    )
    assert (count(module.backbone), count(module.backbone, trainable=True)) == (encoder, encoder - positions)
    assert (count(module.decoder), count(module.decoder, trainable=True)) == (
        predictor,
        predictor - predictor_positions,
    )
    assert count(module.target) == encoder and count(module.target, trainable=True) == 0
    assert (
        module.backbone.cls_token is None
        and module.decoder.predictor_blocks[0].attn.num_heads == cfg.model.backbone.num_heads
    )


@pytest.mark.slow
def test_loss_goes_down_on_a_fixed_batch(tmp_path, synthetic_root):
    cfg = compose_config(
        [
            "experiment=ijepa_vit_tiny_synthetic",
            f"data.root={synthetic_root}",
            *SMALL_VIT,
            "model.decoder.predictor_dim=32",
        ],
        tmp_path,
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    images = torch.stack([datamodule.val_set[i][0] for i in range(0, 20, 2)])  # one image of each class
    torch.manual_seed(0)
    module = instantiate(cfg.task)
    module.target.sync_(module.backbone)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(25):
        out = module.compute_losses(images, module.make_mask(images, step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        module.target.update(module.backbone, step / 25)
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5]), losses  # measured: 0.68


def test_the_encoder_taken_from_a_checkpoint_is_the_target_encoder(tmp_path, synthetic_root):
    """The paper evaluates I-JEPA's EMA target encoder: checkpoints name it, and loading / export read it."""
    from mimlab.checkpoints import load_pretrained
    from mimlab.checkpoints.encoder import checkpoint_encoder
    from mimlab.train import build

    cfg = compose_config(
        [
            "experiment=ijepa_vit_tiny_synthetic",
            f"data.root={synthetic_root}",
            "data.img_size=32",
            *TINY_VIT,
            "model.decoder.predictor_dim=16",
            "masking.min_keep=0",
            "data.batch_size=20",
            "trainer.max_steps=3",
            "hardware.num_workers=0",
            "logger=csv",
            "debug=quiet",
            "+trainer.num_sanity_val_steps=0",
        ],
        tmp_path,
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    teacher, student = module.target.teacher.state_dict(), module.backbone.state_dict()
    assert any(not torch.equal(teacher[k], student[k]) for k in student)  # the EMA lags the student
    loaded = MaskedViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, class_token=False)
    load_pretrained(ckpt, loaded)
    rebuilt = checkpoint_encoder(ckpt).backbone
    for name, value in teacher.items():
        assert torch.equal(loaded.state_dict()[name], value) and torch.equal(rebuilt.state_dict()[name], value), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"target_scale": (0.15, 1.5)},
            r"masking\.target_scale must be two numbers \[lo, hi\] with 0\.0 < lo <= hi <= 1\.0",
        ),
        ({"context_scale": (0.85, 1.2)}, r"masking\.context_scale must be .* <= 1\.0, got \[0\.85, 1\.2\]"),
        ({"target_aspect": (-0.5, 1.5)}, r"masking\.target_aspect must be two numbers \[lo, hi\] with 0\.0 < lo <= hi"),
        ({"target_scale": (0.3, 0.2)}, r"masking\.target_scale must be .*, got \[0\.3, 0\.2\]"),
        ({"min_keep": -1}, r"masking\.min_keep must be >= 0, got -1"),
    ],
)
def test_multiblock_ranges_are_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiBlockMasking(**kwargs)
