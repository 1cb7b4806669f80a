"""Img2Vec composition: parameter counts, teacher frozen through a real optimiser step, mask/teacher-grid
alignment through the decoder, and a tiny pre-training run whose loss falls."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from conftest import SMALL_VIT, compose_config
from mimlab.losses.img2vec import Img2VecLoss
from mimlab.masking import RandomMasking
from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.heads.img2vec import Img2VecDecoder
from mimlab.targets.frozen_teacher import FrozenTeacher
from mimlab.tasks.pretrain import MaskedPretraining
from mimlab.train import build, run


def count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def decoder_params(enc_dim: int, depth: int, dim: int = 512, hidden: int = 2048, out: int = 2048) -> int:
    """Analytic trainable count: blocks + aggregate norm + embed + mask token + final norm + both projection MLPs."""
    block = 12 * dim * dim + 13 * dim
    mlp = lambda i: i * hidden + hidden + hidden * out + out
    return depth * block + 2 * enc_dim + (enc_dim * dim + dim) + dim + 2 * dim + mlp(dim) + mlp(enc_dim)


@pytest.mark.parametrize(
    "experiment,enc_dim,depth,encoder",
    [
        (
            "img2vec_vit_b",
            768,
            2,
            111.908e6 - 26.109e6,
        ),  # docs/methods.md §7 rows 4 and 7: MAE ViT-B total minus its decoder
        ("img2vec_vit_l", 1024, 4, 329.542e6 - 26.240e6),  # rows 5 and 7 (ViT-L)
    ],
)
def test_paper_model_parameter_counts(experiment, enc_dim, depth, encoder, tmp_path):
    cfg = compose_config([f"experiment={experiment}", "logger=csv"], tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    assert count(module.backbone) / 1e6 == pytest.approx(encoder / 1e6, abs=1e-3)
    assert count(module.decoder, trainable_only=True) == decoder_params(enc_dim, depth)
    assert count(module.target) == 25_557_032 - (2048 * 1000 + 1000)  # ResNet-50 without its fc (torchvision count)
    assert count(module.target, trainable_only=True) == 0
    assert not any(k.startswith("target.") for k in module.state_dict())  # frozen teacher stays out of checkpoints
    assert module.masking.ratio == 0.6 and module.masking.unit_size == 32
    assert (module.loss.beta, module.loss.global_weight, module.loss.positions) == (2.0, 0.5, "masked")


def tiny_parts(img: int = 64):
    torch.manual_seed(0)
    encoder = MaskedViT(img, 16, 3, 32, depth=2, num_heads=2, keep_hidden="all")
    decoder = Img2VecDecoder(
        32, 512, img_size=img, patch_size=16, out_stride=32, decoder_dim=32, depth=1, num_heads=2, proj_hidden_dim=64
    )
    teacher = FrozenTeacher("resnet18", stride=32, dim=512)
    return encoder, decoder, teacher


def test_teacher_stays_frozen_through_a_training_step():
    encoder, decoder, teacher = tiny_parts()
    module = MaskedPretraining(encoder, decoder, teacher, Img2VecLoss(), RandomMasking(0.6, 32), optim=None)
    module.train()
    assert not teacher.teacher.training and all(not m.training for m in teacher.teacher.modules())
    before = {k: v.clone() for k, v in teacher.teacher.state_dict().items()}  # weights and BN running stats
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = module.compute_losses(torch.randn(4, 3, 64, 64))
    losses["loss"].backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.teacher.state_dict()[k]) for k, v in before.items())
    # every trainable parameter is used by the loss (DDP with find_unused_parameters=False needs this)
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not any(id(p) in {id(q) for q in teacher.parameters()} for p in trainable)


def test_block_mask_lines_up_with_teacher_grid_through_the_decoder():
    encoder, decoder, _ = tiny_parts()
    decoder.decoder.decoder_blocks = nn.ModuleList()  # no attention: each output token can only see its own patches
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # 2x2 units of 32 px; units 0 and 3 visible
    enc = encoder(torch.randn(1, 3, 64, 64), mask)
    # the ViT's 4x4 patch mask pools back to the unit mask: unit k = patches of teacher token k
    assert torch.equal(F.avg_pool2d(enc.mask.view(1, 1, 4, 4), 2).flatten(1), mask)
    base = decoder(enc, mask)["tokens"]
    visible_patches = torch.argsort(enc.mask, dim=1, stable=True)[0, :8]
    for j, patch in enumerate(visible_patches.tolist()):
        hidden = {i: h.clone() for i, h in enc.hidden.items()}
        hidden[0][:, 1 + j] += 1.0
        changed = decoder(dataclasses.replace(enc, hidden=hidden), mask)["tokens"]
        moved = (changed - base).abs().sum(-1)[0].nonzero().flatten().tolist()
        r, c = divmod(patch, 4)
        assert moved == [(r // 2) * 2 + c // 2]  # only the teacher token of this patch's 32-px unit


def test_decoder_errors_name_the_config_keys():
    with pytest.raises(ValueError, match="keep_hidden=all"):
        encoder, decoder, _ = tiny_parts()
        encoder.keep_hidden = ()
        decoder(encoder(torch.randn(1, 3, 64, 64), torch.tensor([[0.0, 1.0, 1.0, 1.0]])))
    with pytest.raises(ValueError, match="out_stride"):
        Img2VecDecoder(32, 8, img_size=64, patch_size=16, out_stride=24)


TINY = [
    "experiment=img2vec_vit_tiny_synthetic",
    "data.batch_size=8",
    "hardware.num_workers=0",
    *SMALL_VIT,
    "model.backbone.patch_size=16",
    "model.decoder.decoder_dim=32",
    "model.decoder.num_heads=2",
    "model.decoder.proj_hidden_dim=64",
    "optim.warmup_epochs=1",
    "optim.blr=5e-3",
    "logger=csv",
    "~callbacks.progress",
    "trainer.log_every_n_steps=2",
]


@pytest.mark.slow
def test_tiny_img2vec_pretraining_lowers_the_loss(tmp_path, synthetic_root):
    overrides = [*TINY, f"data.root={synthetic_root}", "trainer.max_epochs=8"]
    cfg = compose_config(overrides, tmp_path)
    datamodule, module, trainer = build(compose_config(overrides, tmp_path / "untrained"))  # a run folder of its own
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    result = run(cfg)
    after = result["metrics"]
    assert after["val/loss"] < 0.7 * before["val/loss"], (before, after)
    assert after["val/loss_patch"] < before["val/loss_patch"] and after["val/loss_global"] < before["val/loss_global"]
    ckpt = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=False)
    assert not any(k.startswith("target.") for k in ckpt["state_dict"])  # no frozen teacher weights in the .ckpt
    assert any(k.startswith("decoder.proj.") for k in ckpt["state_dict"])
