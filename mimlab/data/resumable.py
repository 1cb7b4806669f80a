"""Exactly resumable, rank-sharded data order and per-sample seeded augmentation.

:class:`ResumableSampler` (training) yields ``(index, sample_seed)`` pairs: the order is a permutation drawn from
(seed, epoch), dealt to ranks like ``DistributedSampler`` (rank ``r`` takes positions ``r, r + W, r + 2W, ...``), and can
start ``skip`` samples into an epoch. With ``W`` ranks of batch ``B`` a step therefore consumes the same ``W·B`` samples
as one process with batch ``W·B``.
:class:`EvalSampler` (validation) gives rank ``r`` the contiguous block ``[r·n/W, (r+1)·n/W)`` without padding: no sample
is evaluated twice and gathering the ranks' results in rank order restores the data set order.
:class:`SeededDataset` runs the wrapped dataset (and its random transforms) under ``sample_seed``, so a sample's
augmentation depends only on (seed, epoch, index), not on worker count, prefetching or process restarts.
:class:`EpochAwareDataLoader` starts its workers at the first ``next()``, after Lightning has set the epoch, and tells
Lightning that it resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (an LCG step per value), e.g. ``mix_seed(seed, epoch, index)``."""
    out = 0
    for v in values:
        out = (out * 6_364_136_223_846_793_005 + v + 1_442_695_040_888_963_407) % (2**63)
    return out


MASK_STREAM = 0x6D61736B  # sets the mask seeds apart from the augmentation seeds of the same samples
VALIDATION_STREAM = 0x76616C


def training_mask_seed(sample_seed: int) -> int:
    """The mask seed of a training sample whose augmentation runs under ``sample_seed`` = (seed, epoch, index)."""
    return mix_seed(sample_seed, MASK_STREAM)


def validation_mask_seed(seed: int, index: int) -> int:
    """The mask seed of validation sample ``index``: no epoch, so every validation sees the same masks."""
    return mix_seed(seed, VALIDATION_STREAM, index)


class ResumableSampler(Sampler):
    """Shuffled (or sequential) per-epoch order over ``length`` samples for rank ``rank`` of ``num_replicas``.

    ``set_epoch`` is called by Lightning each epoch; ``resume_at(epoch, consumed)`` makes that epoch start after
    ``consumed`` samples of this rank (a mid-epoch resume) and has no effect on other epochs.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self.skip = 0
        self._skip_epoch: int | None = None
        per_rank = length / num_replicas
        self.num_samples = math.floor(per_rank) if drop_last else math.ceil(per_rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Start ``epoch`` after ``consumed`` samples of this rank (no effect on later epochs)."""
        self._skip_epoch, self.skip = epoch, consumed

    def epoch_order(self) -> list[int]:
        """This rank's sample indices for the current epoch, in order (before any resume skip)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.num_replicas
        order = order[:total] if self.drop_last else (order * math.ceil(total / max(len(order), 1)))[:total]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.skip if self._skip_epoch == self.epoch else 0
        for index in self.epoch_order()[start:]:
            yield index, mix_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        """The full epoch length (Lightning counts a resumed epoch's batches from its restored progress)."""
        return self.num_samples


class EvalSampler(Sampler):
    """Rank ``rank`` of ``num_replicas`` reads the contiguous block ``[rank·n/W, (rank+1)·n/W)`` of ``range(length)``.

    Blocks differ in size by at most one sample and nothing is padded, so every sample is evaluated exactly once.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.start = length * rank // num_replicas
        self.stop = length * (rank + 1) // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``dataset[(index, seed)]`` runs ``base[index]`` with torch's RNG seeded by ``seed``.

    ``mask_seed`` (the run's seed) appends each sample's mask seed to it, for the masks drawn in the workers
    (:mod:`mimlab.data.masks`): from ``seed`` for a training key, from (``mask_seed``, index) for a validation index."""

    def __init__(self, base: Dataset, mask_seed: int | None = None) -> None:
        self.base = base
        self.mask_seed = mask_seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key):
        sample = self._sample(key)
        if self.mask_seed is None:
            return sample
        seed = validation_mask_seed(self.mask_seed, key) if isinstance(key, int) else training_mask_seed(key[1])
        return (*sample, seed)

    def _sample(self, key):
        if isinstance(key, int):
            return self.base[key]
        index, seed = key
        # torch.default_generator only: torch.manual_seed would also queue a lazy CUDA seeding call (with a formatted
        # stack trace, ~1 ms) per sample in a CUDA build, and reseed a live GPU's RNG in the main process
        if get_worker_info() is not None:  # a worker's RNG serves only its samples: seed it, no need to restore it
            torch.default_generator.manual_seed(seed)
            return self.base[index]
        with torch.random.fork_rng(devices=[]):  # the main process: leave the model's random stream untouched
            torch.default_generator.manual_seed(seed)
            return self.base[index]


class EpochAwareDataLoader(DataLoader):
    """A ``DataLoader`` whose iterator starts (and its workers prefetch) at the first ``next()``, not at ``iter()``.

    Lightning calls ``iter()`` on the training loader before it calls ``sampler.set_epoch`` (and, when resuming, does
    not call it again). A plain loader with worker processes would then prefetch the order of the sampler's previous
    epoch (epoch 0 in a resumed process). Deferring the start makes every epoch read the order of the epoch it trains.
    """

    def __iter__(self) -> Iterator:  # type: ignore[override]
        start = super().__iter__

        def deferred() -> Iterator:
            yield from start()

        return deferred()

    def state_dict(self) -> dict:
        """Empty: the DataModule's state (epoch, batches trained, geometry, data) positions this loader's sampler before
        the loader is built. Having ``state_dict`` / ``load_state_dict`` is how Lightning recognises a resumable loader:
        without them it warns on every mid-epoch resume that the loader is not resumable, which is wrong here."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to load (see :meth:`state_dict`)."""
