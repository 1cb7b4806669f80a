"""The one DataModule base: rank sharding, seeded order and augmentation, exact mid-epoch resume, data fingerprint.

A concrete DataModule (ImageNet folder, shards, COCO, ADE20K, synthetic) only builds its two map-style datasets
(:meth:`ResumableDataModule.build_datasets`), says what identifies its data (:meth:`ResumableDataModule.data_identity`)
and, where its samples do not stack, sets ``train_collate`` / ``val_collate``. Everything else lives here:

* training: :class:`~mimlab.data.resumable.ResumableSampler` - per-epoch permutation from (seed, epoch), dealt to the
  ``W`` ranks so that one step reads the same ``W·B`` samples whatever ``W``; every sample's augmentation runs under
  its own seed (seed, epoch, index); the loader starts its workers only when the epoch's first batch is requested;
* validation: :class:`~mimlab.data.resumable.EvalSampler` - contiguous, unpadded blocks per rank (each sample once);
* pre-training masks (:meth:`ResumableDataModule.deliver_masks`): drawn per sample in the workers, seeded by
  (seed, epoch, index) - (seed, index) in validation - and appended to each batch (:mod:`mimlab.data.masks`);
* ``state_dict`` / ``load_state_dict``: the epoch, the batches of it already trained, the batch geometry and the data
  fingerprint. A resume continues after exactly those batches; resuming on other data, or mid-epoch with another
  batch size or process count, stops with :class:`DataResumeError` naming what differs (``allow_data_change=true``
  continues anyway, approximately).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mimlab.data.masks import MaskingCollate
from mimlab.data.resumable import EpochAwareDataLoader, EvalSampler, ResumableSampler, SeededDataset
from mimlab.data.transforms import normalize_images
from mimlab.data.workers import init_worker
from mimlab.masking.base import MaskGenerator
from mimlab.utils.refusal import Refusal

log = logging.getLogger(__name__)


class DataResumeError(Refusal, ValueError):
    """The checkpoint being resumed was trained on other data or another batch geometry; the message says what."""


class ResumableDataModule(L.LightningDataModule):
    """Base of every mimlab DataModule (see module docstring).

    Args:
        root: the data folder.
        batch_size: per-process training batch. val_batch_size: per-process validation batch (None: ``batch_size``).
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader settings.
        seed: fixes the per-epoch order and every sample's augmentation.
        drop_last: drop the last incomplete training batch (every rank then runs the same number of steps).
        allow_data_change: resume even when the data or the mid-epoch batch geometry differ from the checkpoint's.
    """

    train_collate: Callable | None = None
    val_collate: Callable | None = None

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
        seed: int = 0,
        drop_last: bool = True,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("data.batch_size", batch_size), ("data.val_batch_size", val_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 (images per process), got {value}")
        self.root = Path(root)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.seed = seed
        self.drop_last = drop_last
        self.allow_data_change = allow_data_change
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._fingerprint: dict[str, str] | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already consumed in it)
        self.masking: MaskGenerator | None = None  # set by deliver_masks
        self.training_batch_transform: Callable[[Any], Any] | None = None  # set by transform_training_batches

    # ------------------------------------------------------------------------------------------ format hooks
    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """The (train, val) map-style datasets; raise a clear error when the folder does not fit the format."""
        raise NotImplementedError

    def data_identity(self) -> tuple[str, Iterable[str]]:
        """(a short summary such as '600 train + 200 val images', lines that identify the data: names, not bytes)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ masks
    def deliver_masks(self, masking: MaskGenerator) -> None:
        """Draw every sample's masks with ``masking`` in the loader workers and append them to each batch as a
        :class:`~mimlab.masking.MaskSet` (:mod:`mimlab.data.masks`); the pre-training task calls this at setup,
        before the loaders are built."""
        self.masking = masking

    def transform_training_batches(self, transform: Callable[[Any], Any]) -> None:
        """Apply ``transform`` to every training batch on the device, after the transfer and normalisation and outside
        the (possibly compiled) training step: Mixup/CutMix, whose per-batch draws are host-side (the fine-tuning task
        calls this at setup)."""
        self.training_batch_transform = transform

    def mask_image_size(self) -> tuple[int, int] | None:
        """(H, W) of the images the model sees, for the mask grid; None = read from each collated batch."""
        return None

    # ------------------------------------------------------------------------------------------ datasets
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.build_datasets()

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(
        self,
        dataset: Dataset,
        sampler,
        batch_size: int,
        drop_last: bool,
        collate: Callable | None,
        loader_class: type[DataLoader] = DataLoader,
    ) -> DataLoader:
        """A loader over ``dataset`` with its own generator: creating its iterator draws the workers' base seed from
        that generator, not from torch's global RNG, so the worker count cannot change the model's random stream
        (drop path, proposal sampling, ...) and a resumed run continues it where the checkpoint left it."""
        if self.masking is not None:
            collate = MaskingCollate(self.masking, collate, self.mask_image_size())
        return loader_class(
            SeededDataset(dataset, None if self.masking is None else self.seed),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=init_worker,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        num_replicas, rank = self._replicas()
        dataset = self.train_set
        drop_last = self.drop_last and len(dataset) >= self.batch_size * num_replicas  # type: ignore[arg-type]
        sampler = ResumableSampler(
            len(dataset),  # type: ignore[arg-type]
            self.seed,
            shuffle=True,
            num_replicas=num_replicas,
            rank=rank,
            drop_last=drop_last,
        )
        if self._resume is not None:
            sampler.resume_at(*self._resume)
        return self._loader(dataset, sampler, self.batch_size, drop_last, self.train_collate, EpochAwareDataLoader)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        self.setup()
        num_replicas, rank = self._replicas()
        if len(self.val_set) < num_replicas:  # type: ignore[arg-type]
            raise ValueError(
                f"the validation split of {self.root} has {len(self.val_set)} samples, fewer than the "  # type: ignore[arg-type]
                f"{num_replicas} processes; add validation samples or run on fewer devices"
            )
        sampler = EvalSampler(len(self.val_set), num_replicas, rank)  # type: ignore[arg-type]
        return self._loader(self.val_set, sampler, self.val_batch_size, False, self.val_collate)  # type: ignore[arg-type]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 image batches (N, C, H, W) — what the pre-training transforms hand over — are normalised here, on the
        training device (:func:`~mimlab.data.transforms.normalize_images`); then training batches go through the
        :meth:`transform_training_batches` transform, if one is set."""
        batch = self._normalized(batch)
        if self.training_batch_transform is not None and self.trainer is not None and self.trainer.training:
            return self.training_batch_transform(batch)
        return batch

    @staticmethod
    def _normalized(batch: Any) -> Any:
        if (
            isinstance(batch, (list, tuple))
            and batch
            and isinstance(batch[0], torch.Tensor)
            and batch[0].dtype == torch.uint8
            and batch[0].ndim == 4
        ):
            return type(batch)([normalize_images(batch[0]), *batch[1:]])
        return batch

    # ------------------------------------------------------------------------------------------ identity
    def fingerprint(self) -> dict[str, str]:
        """``{"root", "summary", "sha1"}``: the resolved root and a hash of what :meth:`data_identity` lists."""
        if self._fingerprint is None:
            self.setup()
            summary, lines = self.data_identity()
            digest = hashlib.sha1()
            for line in lines:
                digest.update(line.encode())
                digest.update(b"\n")
            self._fingerprint = {"root": str(self.root.resolve()), "summary": summary, "sha1": digest.hexdigest()[:16]}
        return self._fingerprint

    # ------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the epoch, how many of its batches were trained, the geometry and the data."""
        trainer = self.trainer
        if trainer is None:
            return {}
        return {
            "epoch": trainer.current_epoch,
            "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,  # type: ignore[attr-defined]
            "epoch_batches": trainer.num_training_batches,
            "batch_size": self.batch_size,
            "world_size": trainer.world_size,
            "seed": self.seed,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the checkpoint's data and geometry against this run, then position the sampler after its batches."""
        if not state:
            return
        epoch, done = state["epoch"], state["batches_done"]
        world_size = self._replicas()[0]
        old_size, old_world = state.get("batch_size", self.batch_size), state.get("world_size", world_size)
        mid_epoch = 0 < done < state.get("epoch_batches", done + 1)
        problems = self._resume_problems(state, mid_epoch, world_size)
        if problems:
            where = getattr(self.trainer, "ckpt_path", None) or "the checkpoint"
            text = f"cannot resume {where} exactly:\n  " + "\n  ".join(problems)
            if not self.allow_data_change:
                raise DataResumeError(
                    text + "\nResume with the original data and batch settings, or set "
                    "data.allow_data_change=true to continue anyway (the rest of the epoch "
                    "is then not the one the checkpoint would have seen)."
                )
            log.warning("%s\ncontinuing because data.allow_data_change=true", text)
        consumed = done * old_size * old_world // world_size  # samples of this rank already trained on
        self._resume = (epoch, consumed)

    def _resume_problems(self, state: dict[str, Any], mid_epoch: bool, world_size: int) -> list[str]:
        problems = []
        saved, current = state.get("fingerprint"), self.fingerprint()
        if saved and saved["sha1"] != current["sha1"]:
            problems.append(
                f"data: {saved['summary']} in {saved['root']} (sha1 {saved['sha1']}) -> "
                f"{current['summary']} in {current['root']} (sha1 {current['sha1']})"
            )
        elif saved and saved["root"] != current["root"]:
            log.warning(
                "resuming on %s; the checkpoint read %s (same files, sha1 %s)",
                current["root"],
                saved["root"],
                current["sha1"],
            )
        if "seed" in state and state["seed"] != self.seed:
            problems.append(f"data seed (data order and augmentation): {state['seed']} -> {self.seed}")
        if mid_epoch:
            geometry = [
                ("data.batch_size", state.get("batch_size"), self.batch_size),
                ("processes (devices x nodes)", state.get("world_size"), world_size),
            ]
            problems += [
                f"{name} {old} -> {new} in the middle of epoch {state['epoch']} "
                f"({state['batches_done']} of {state['epoch_batches']} batches done)"
                for name, old, new in geometry
                if old is not None and old != new
            ]
        return problems
