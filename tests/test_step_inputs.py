"""What the training step receives, so that it does no host work of its own.

Pre-training: masks drawn in the DataLoader workers, one per sample, seeded by (seed, epoch, index): the same masks for an image
whatever the batch size, the worker count, the rank it lands on or a resume; validation masks fixed across epochs;
the training step takes them from the batch and draws nothing itself. (Two real processes: tests/test_ddp.py, MAE 2 x
batch B vs 1 x batch 2B, same weights and the same val/loss.)
Fine-tuning: Mixup/CutMix applied by the DataModule after the transfer, before the step.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import TINY_MAE, TINY_MAE_QUIET, compose_config
from mimlab.data.imagenet import ImageNetDataModule
from mimlab.masking import MaskSet, RandomMasking
from mimlab.masking.blockwise import BlockMasking
from mimlab.masking.inverse_block import InverseBlockMasking
from mimlab.masking.multi_mask import MultiMask
from mimlab.masking.multiblock import MultiBlockMasking
from mimlab.train import run

PER_IMAGE = {
    "random": lambda: RandomMasking(0.75, 8),
    "block": lambda: BlockMasking(unit_size=8, num_masked=None, ratio=0.4, min_num_patches=2),
    "multi_mask": lambda: MultiMask(InverseBlockMasking(ratio=0.75, unit_size=8), clones=2),
}


class Ranked(ImageNetDataModule):
    """The DataModule as rank ``rank`` of ``world`` processes sees it (the sampler split of a DDP run)."""

    def __init__(self, *args, world: int = 1, rank: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.world, self.rank = world, rank

    def _replicas(self) -> tuple[int, int]:
        return self.world, self.rank


def epoch_masks(root, masking, batch_size, workers=0, world=1, rank=0, epoch=0, resume_at=0, split="train", size=32):
    """sample index -> its mask rows (clones x L), for one epoch of the train (or val) loader."""
    dm = Ranked(str(root), img_size=size, batch_size=batch_size, num_workers=workers, seed=3, world=world, rank=rank)
    dm.deliver_masks(masking)
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    sampler = loader.sampler
    if split == "train":
        sampler.set_epoch(epoch)
        if resume_at:
            sampler.resume_at(epoch, resume_at)
        order = sampler.epoch_order()[resume_at:]
    else:
        order = list(sampler)
    out, position = {}, 0
    for batch in loader:
        masks = batch[-1]
        assert isinstance(masks, MaskSet) and len(batch) == 3  # (images, labels, masks)
        assert masks.visible == int((1 - masks.mask[0]).sum())  # the stated count is the true one
        rows = masks.mask.reshape(batch[0].shape[0], masks.clones, -1)
        for row in rows:
            out[order[position]] = row
            position += 1
    return out


def same(a: dict, b: dict) -> bool:
    shared = set(a) & set(b)
    return len(shared) > 0 and all(torch.equal(a[i], b[i]) for i in shared)


@pytest.mark.parametrize("kind", list(PER_IMAGE))
def test_an_images_masks_do_not_depend_on_batch_size_workers_rank_or_resume(kind, synthetic_root):
    masking = PER_IMAGE[kind]()
    reference = epoch_masks(synthetic_root, masking, batch_size=8)
    assert len(reference) == 56  # 60 training images, full batches of 8
    assert same(reference, epoch_masks(synthetic_root, masking, batch_size=32))
    assert same(reference, epoch_masks(synthetic_root, masking, batch_size=8, workers=2))
    two_ranks = {
        **epoch_masks(synthetic_root, masking, batch_size=4, world=2, rank=0),
        **epoch_masks(synthetic_root, masking, batch_size=4, world=2, rank=1),
    }
    assert same(reference, two_ranks) and set(two_ranks) == set(reference)
    assert same(reference, epoch_masks(synthetic_root, masking, batch_size=8, resume_at=24))
    next_epoch = epoch_masks(synthetic_root, masking, batch_size=8, epoch=1)
    assert not same(reference, next_epoch)  # a new epoch draws new masks
    distinct = {tuple(m.flatten().tolist()) for m in reference.values()}
    assert len(distinct) > len(reference) // 2  # masks differ from image to image


def test_validation_masks_depend_on_the_sample_only(synthetic_root):
    masking = PER_IMAGE["random"]()
    reference = epoch_masks(synthetic_root, masking, batch_size=8, split="val")
    assert len(reference) == 20
    assert same(reference, epoch_masks(synthetic_root, masking, batch_size=3, split="val", workers=2))
    assert same(reference, epoch_masks(synthetic_root, masking, batch_size=8, split="val", epoch=5))
    two_ranks = {
        **epoch_masks(synthetic_root, masking, batch_size=4, world=2, rank=0, split="val"),
        **epoch_masks(synthetic_root, masking, batch_size=4, world=2, rank=1, split="val"),
    }
    assert set(two_ranks) == set(reference) and same(reference, two_ranks)


def test_ijepa_masks_are_per_batch_by_design_but_independent_of_workers(synthetic_root):
    """I-JEPA draws one block size per batch and truncates the context to the batch's smallest (the official collator),
    so its masks depend on the batch; drawn in the workers they still do not depend on the worker count."""
    masking = MultiBlockMasking(min_keep=2, unit_size=8)
    assert not masking.per_image
    a = epoch_masks(synthetic_root, masking, batch_size=8, size=64)
    assert same(a, epoch_masks(synthetic_root, masking, batch_size=8, workers=2, size=64))


def test_the_training_step_takes_the_masks_from_the_batch(tmp_path, monkeypatch):
    """A real fit: every training and validation batch arrives with its masks; no step draws one itself."""
    from mimlab.tasks.pretrain import MaskedPretraining

    batches = []
    original = MaskedPretraining.batch_masks

    def recording(self, batch, *keys):
        batches.append(batch)
        return original(self, batch, *keys)

    def refuse(*args, **kwargs):
        raise AssertionError("a step drew its own masks")

    monkeypatch.setattr(MaskedPretraining, "batch_masks", recording)
    monkeypatch.setattr(MaskedPretraining, "_step_seeds", refuse)
    cfg = compose_config(
        [*TINY_MAE_QUIET, "trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2"],
        tmp_path,
    )
    run(cfg)
    assert len(batches) >= 5  # 3 training + 2 validation steps (+ the sanity check)
    assert all(isinstance(b[-1], MaskSet) and b[-1].visible == 4 for b in batches)  # 16 units, 75 % masked


def test_finetuning_batches_are_mixed_before_the_step(synthetic_root, tmp_path, monkeypatch):
    """A real fine-tuning fit with Mixup/CutMix: every training step receives mixed images and soft targets (the
    DataModule mixed them after the transfer, outside the compiled step); validation batches keep class indices."""
    from mimlab.tasks.finetune import FineTuning

    seen: list[tuple[str, int]] = []
    train_step, val_step = FineTuning.training_step, FineTuning.validation_step

    def record_train(self, batch, batch_idx):
        seen.append(("train", batch[1].ndim))
        return train_step(self, batch, batch_idx)

    def record_val(self, batch, batch_idx):
        seen.append(("val", batch[1].ndim))
        return val_step(self, batch, batch_idx)

    monkeypatch.setattr(FineTuning, "training_step", record_train)
    monkeypatch.setattr(FineTuning, "validation_step", record_val)
    cfg = compose_config(
        [
            "experiment=finetune_vit_tiny_synthetic",
            f"data.root={synthetic_root}",
            "data.img_size=32",
            "data.batch_size=8",
            "hardware.num_workers=0",
            "logger=csv",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1",
            "~callbacks.progress",
        ],
        tmp_path,
    )
    assert cfg.task.mixup is not None  # the recipe mixes
    run(cfg)
    assert ("train", 2) in seen and ("train", 1) not in seen  # soft targets (N, classes) in every training step
    assert ("val", 1) in seen and ("val", 2) not in seen


READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")  # a device->host read on a GPU


class HostReads(L.Callback):
    """Counts the tensor reads that copy to the host (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``, ...: a device
    sync on a GPU), made in the main process from the start of each training batch to its end (step, backward,
    optimiser, callbacks). Each read is counted once, however torch implements it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.per_step: list[int] = []
        self.counting = False
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if self.counting:
                    self.counting = False  # a read inside a read (tolist -> item) counts once
                    try:
                        self.per_step[-1] += 1
                        return _original(tensor, *args, **kwargs)
                    finally:
                        self.counting = True
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.per_step.append(0)
        self.counting = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counting = False


@pytest.mark.parametrize(("guard", "reads"), [("off", 0), ("stop", 1)])
def test_a_training_step_reads_nothing_back_but_the_guards_one_value(guard, reads, tmp_path, monkeypatch):
    """With every pre-training callback on (progress bar, dashboard, throughput, checkpoints, ...) a step between
    logging steps makes no device->host read, except the one value the non-finite guard checks (none when it is off)."""
    import mimlab.train

    counter = HostReads(monkeypatch)
    build = mimlab.train.build

    def build_with_counter(cfg):
        datamodule, module, trainer = build(cfg)
        trainer.callbacks.append(counter)
        return datamodule, module, trainer

    monkeypatch.setattr(mimlab.train, "build", build_with_counter)
    cfg = compose_config(
        [
            *TINY_MAE,
            "hardware.num_workers=2",  # masks are drawn in the workers, as in real runs
            "hardware.fused_optimizer=true",  # as on a GPU; the for-loop AdamW reads each step count (a host tensor)
            f"nan_guard={guard}",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=6",
            "+trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=100",
            "model.decoder.embed_dim=16",
            "model.decoder.num_heads=2",
        ],
        tmp_path,
    )
    run(cfg)
    assert len(counter.per_step) == 6
    assert counter.per_step[1:-1] == [reads] * 4, counter.per_step  # the last step also logs (the run stops)
