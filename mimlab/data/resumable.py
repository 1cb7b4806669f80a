"""Exactly resumable data order and augmentation.

:class:`ResumableSampler` yields ``(index, sample_seed)`` pairs: the order is a permutation drawn from
(seed, epoch), split across ranks like ``DistributedSampler``, and can start ``skip`` samples into an epoch.
:class:`SeededDataset` runs the wrapped dataset (and its random transforms) under ``sample_seed``, so a sample's
augmentation depends only on (seed, epoch, index) — not on worker count, prefetching or process restarts.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def _mix(*values: int) -> int:
    out = 0
    for v in values:
        out = (out * 6_364_136_223_846_793_005 + v + 1_442_695_040_888_963_407) % (2**63)
    return out


class ResumableSampler(Sampler):
    """Shuffled (or sequential) per-epoch order over ``length`` samples for rank ``rank`` of ``num_replicas``.

    ``set_epoch`` is called by Lightning each epoch; ``skip`` (samples of this rank already consumed in the current
    epoch) is set when resuming mid-epoch and cleared when the next epoch starts.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = True) -> None:
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

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.num_replicas
        order = order[:total] if self.drop_last else (order * math.ceil(total / max(len(order), 1)))[:total]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.skip if self._skip_epoch == self.epoch else 0
        for index in self._order()[start:]:
            yield index, _mix(self.seed, self.epoch, index)

    def __len__(self) -> int:
        """The full epoch length (Lightning counts a resumed epoch's batches from its restored progress)."""
        return self.num_samples


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``dataset[(index, seed)]`` runs ``base[index]`` with torch's RNG seeded by ``seed``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.base[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]
