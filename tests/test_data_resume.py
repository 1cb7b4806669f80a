"""The DataModule base in-process: rank sharding, exact resume of every DataModule with and without worker processes,
and the checks a resume makes against the checkpoint's data fingerprint and batch geometry."""

from __future__ import annotations

import hashlib
import logging
import shutil

import pytest
import torch

from mimlab.data.ade20k import ADE20KDataModule
from mimlab.data.base import DataResumeError
from mimlab.data.coco import COCODataModule
from mimlab.data.gpu_decode import GPUDecodeImageNetDataModule
from mimlab.data.image_folder import DataLayoutError
from mimlab.data.imagenet import ImageNetDataModule
from mimlab.data.resumable import EvalSampler, ResumableSampler
from mimlab.data.shards import ShardedImageNetDataModule, write_shards
from mimlab.data.synthetic import SyntheticImageNetDataModule


@pytest.fixture(scope="module")
def roots(synthetic_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("dm")
    for split in ("train", "val"):
        write_shards(synthetic_root, base / "shards", split, shard_size=16)
    return {"imagenet": synthetic_root, "shards": base / "shards", "coco": base / "coco", "ade": base / "ade"}


def make(kind: str, roots, **kw):
    common = {"batch_size": 4, "seed": 7, **kw}
    if kind == "imagenet":
        return ImageNetDataModule(str(roots["imagenet"]), img_size=32, **common)
    if kind == "synthetic":
        return SyntheticImageNetDataModule(str(roots["imagenet"]), img_size=32, **common)
    if kind == "gpu_decode":  # the batch carries each image's crop/flip seed; the device applies it
        return GPUDecodeImageNetDataModule(str(roots["imagenet"]), img_size=32, **common)
    if kind == "shards":
        return ShardedImageNetDataModule(str(roots["shards"]), img_size=32, **common)
    if kind == "coco":
        return COCODataModule(str(roots["coco"]), generate_if_missing=True, synthetic_size=32, num_classes=3, **common)
    return ADE20KDataModule(str(roots["ade"]), img_size=32, generate_if_missing=True, synthetic_size=32, **common)


def digest(batch) -> str:
    """A hash of a batch's images and labels/targets (the exact tensors the model would see)."""
    h = hashlib.sha1()

    def add(x):
        if isinstance(x, torch.Tensor):
            h.update(x.detach().contiguous().numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x):
                add(x[k])
        elif isinstance(x, (list, tuple)):
            for item in x:
                add(item)
        else:
            h.update(repr(x).encode())

    add(batch)
    return h.hexdigest()


def epoch_batches(dm, epoch: int) -> list[str]:
    """The batches of ``epoch`` as a Lightning fit reads them: ``iter()`` first, ``set_epoch`` second."""
    loader = dm.train_dataloader()
    iterator = iter(loader)
    loader.sampler.set_epoch(epoch)
    return [digest(b) for b in iterator]


def test_ranks_split_an_epoch_disjointly_and_a_step_reads_what_one_process_with_the_whole_batch_reads():
    world, batch = 3, 4
    ranks = [ResumableSampler(50, seed=1, num_replicas=world, rank=r) for r in range(world)]
    orders = [[i for i, _ in s] for s in ranks]
    assert all(len(o) == 16 for o in orders)
    assert sorted(sum(orders, [])) == sorted(ResumableSampler(50, seed=1).epoch_order()[:48])
    single = ResumableSampler(50, seed=1).epoch_order()
    for step in range(16 // batch):
        together = {i for o in orders for i in o[step * batch : (step + 1) * batch]}
        assert together == set(single[step * world * batch : (step + 1) * world * batch])
    seeds = {r: dict(s) for r, s in enumerate(ranks)}  # a sample's augmentation seed does not depend on its rank
    assert all(seed == dict(ResumableSampler(50, seed=1))[i] for d in seeds.values() for i, seed in d.items())


def test_validation_blocks_cover_every_sample_once_without_padding():
    for n, world in ((20, 2), (21, 2), (7, 3), (3, 3)):
        blocks = [list(EvalSampler(n, world, r)) for r in range(world)]
        assert sum(blocks, []) == list(range(n))  # rank order restores the data set order
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["imagenet", "synthetic", "gpu_decode", "shards", "coco", "ade"])
def test_resume_mid_epoch_and_at_the_epoch_boundary_reads_the_uninterrupted_batches(kind, workers, roots):
    reference = make(kind, roots, num_workers=0)
    epoch1, epoch2 = epoch_batches(reference, 1), epoch_batches(reference, 2)
    assert epoch1 != epoch2 and len(set(epoch1)) == len(epoch1)
    state = {
        **dict(epoch=1, batch_size=4, world_size=1, seed=7),
        "fingerprint": reference.fingerprint(),
        "epoch_batches": len(epoch1),
    }
    for done, epoch, expected in ((3, 1, epoch1[3:]), (len(epoch1), 2, epoch2)):
        resumed = make(kind, roots, num_workers=workers, persistent_workers=True)
        resumed.setup()
        resumed.load_state_dict({**state, "batches_done": done})
        assert epoch_batches(resumed, epoch) == expected, f"{kind}, {workers} workers, {done} batches done"


def test_resume_on_other_data_names_both_and_the_way_out(roots, tmp_path, caplog):
    dm = make("imagenet", roots)
    dm.setup()
    state = {
        "epoch": 0,
        "batches_done": 0,
        "epoch_batches": 15,
        "batch_size": 4,
        "world_size": 1,
        "seed": 7,
        "fingerprint": dm.fingerprint(),
    }
    copy = tmp_path / "copy"
    shutil.copytree(roots["imagenet"], copy)
    moved = ImageNetDataModule(str(copy), img_size=32, batch_size=4, seed=7)
    moved.setup()
    with caplog.at_level(logging.WARNING):
        moved.load_state_dict(state)  # same files elsewhere: resumes, and says so
    assert f"resuming on {copy}" in caplog.text
    (copy / "val" / "00_circle").rename(copy / "val" / "zz_unknown")
    with pytest.raises(DataLayoutError, match="training split does not have: zz_unknown"):  # never matched by index
        ImageNetDataModule(str(copy), img_size=32, batch_size=4, seed=7).setup()
    (copy / "val" / "zz_unknown").rename(copy / "val" / "00_circle")
    sorted((copy / "train" / "00_circle").iterdir())[0].unlink()  # now other data
    changed = ImageNetDataModule(str(copy), img_size=32, batch_size=4, seed=7)
    changed.setup()
    with pytest.raises(
        DataResumeError,
        match=r"(?s)data: 60 train \+ 20 val images in .*59 train \+ 20 val images in "
        r".*data\.allow_data_change=true",
    ):
        changed.load_state_dict(state)


def test_mid_epoch_resume_with_another_batch_geometry_is_refused_unless_allowed(roots, caplog):
    dm = make("imagenet", roots, batch_size=2)
    dm.setup()
    state = {
        "epoch": 1,
        "batches_done": 5,
        "epoch_batches": 15,
        "batch_size": 4,
        "world_size": 2,
        "seed": 7,
        "fingerprint": dm.fingerprint(),
    }
    with pytest.raises(
        DataResumeError,
        match=r"(?s)data\.batch_size 4 -> 2 in the middle of epoch 1 \(5 of 15.*"
        r"processes \(devices x nodes\) 2 -> 1",
    ):
        dm.load_state_dict(state)
    dm.load_state_dict({**state, "batches_done": 15})  # at the epoch boundary the geometry may change
    allowed = make("imagenet", roots, batch_size=2, allow_data_change=True)
    allowed.setup()
    with caplog.at_level(logging.WARNING):
        allowed.load_state_dict(state)
    assert "allow_data_change=true" in caplog.text
    assert allowed._resume == (1, 5 * 4 * 2)  # the same samples are skipped: 40 of this single process


def test_validation_classes_are_matched_to_training_classes_by_name(roots, tmp_path):
    root = tmp_path / "subset"
    shutil.copytree(roots["imagenet"], root)
    for name in ("00_circle", "01_square"):
        shutil.rmtree(root / "val" / name)
    dm = ImageNetDataModule(str(root), img_size=32, batch_size=4)
    dm.setup()
    train_idx = dm.train_set.class_to_idx
    assert dm.val_set.class_to_idx == train_idx
    assert {label for _, label in dm.val_set.samples} == {
        train_idx[c] for c in train_idx if c not in ("00_circle", "01_square")
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_leave_the_global_rng_to_the_model(workers, roots):
    """Creating a loader iterator draws its workers' base seed; from torch's global RNG that would make the model's
    random stream (drop path, proposal sampling) depend on the worker count and on when iterators are created."""
    dm = make("coco", roots, num_workers=workers)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.rand(3), expected)


def test_lightning_sees_the_training_loader_as_resumable(synthetic_root, tmp_path):
    """Resumed mid-epoch, Lightning does not warn that the loader is 'not resumable' (it resumes exactly)."""
    import warnings

    from conftest import TINY_MAE_QUIET, compose_config
    from mimlab.train import build

    args = [*TINY_MAE_QUIET, f"data.root={synthetic_root}", "data.batch_size=8", "trainer.max_epochs=1"]
    kill = ["+callbacks.kill._target_=mimlab.callbacks.fault_injection.KillAtStep", "+callbacks.kill.step=3"]
    datamodule, module, trainer = build(compose_config([*args, *kill, "+callbacks.kill.signal_name=SIGTERM"], tmp_path))
    with pytest.raises(SystemExit):
        trainer.fit(module, datamodule=datamodule)
    datamodule, module, trainer = build(compose_config(args, tmp_path / "resumed"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert trainer.global_step == 7
    assert not [w for w in caught if "not resumable" in str(w.message)]
