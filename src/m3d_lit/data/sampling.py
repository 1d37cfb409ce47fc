"""Samplers that shard deterministically per epoch under DDP and tell each sample its epoch.

They subclass ``DistributedSampler`` so Lightning neither wraps nor replaces them, and it calls their
``set_epoch`` at every epoch start (also after a resume). Each yields ``SampleKey(index, epoch)`` so the
Dataset seeds a sample's augmentation from (seed, epoch, index) in whichever worker loads it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from m3d_lit.data.datasets import SampleKey

__all__ = ["EpochSampler", "MixSampler", "MixDataset", "seed_worker"]


class EpochSampler(DistributedSampler):
    """A seeded shuffle (or the plain order) of one dataset, split evenly across ranks.

    Args:
        dataset: the map-style dataset.
        num_replicas: number of ranks (1 outside DDP).
        rank: this rank.
        shuffle: reshuffle each epoch from (seed, epoch).
        seed: shuffling seed, the same on every rank.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside num_replicas {num_replicas}")
        # drop_last=False: short ranks repeat the first indices so every rank runs the same step count
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)

    def epoch_indices(self) -> list[int]:
        """All indices of this epoch before sharding (identical on every rank)."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        indices = self.epoch_indices()
        if not indices:
            return iter(())
        indices += (indices * (self.total_size // len(indices) + 1))[: self.total_size - len(indices)]
        mine = indices[self.rank : self.total_size : self.num_replicas]
        return iter(SampleKey(i, self.epoch) for i in mine)


class MixDataset(Dataset):
    """Several datasets behind one index space (source after source)."""

    def __init__(self, datasets: Mapping[str, Dataset]) -> None:
        self.names = list(datasets)
        self.datasets = [datasets[name] for name in self.names]
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside a mix of {len(self)} samples")
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return source, index - self.offsets[source]

    def __getitem__(self, key: int | SampleKey) -> Any:
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        source, local = self.locate(index)
        return self.datasets[source][SampleKey(local, epoch)]


class MixSampler(EpochSampler):
    """Draws ``num_samples`` per epoch: a source by weight, then the next item of that source's shuffle.

    Args:
        dataset: the ``MixDataset``.
        weights: one positive weight per source, in ``dataset.names`` order.
        num_samples: samples per epoch over all ranks.
        num_replicas: number of ranks.
        rank: this rank.
        seed: the draws depend only on (seed, epoch).
    """

    def __init__(
        self,
        dataset: MixDataset,
        weights: Sequence[float],
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        if len(weights) != len(dataset.datasets) or min(weights, default=0) <= 0:
            raise ValueError(f"need one positive weight per source {dataset.names}, got {list(weights)}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        empty = [n for n, d in zip(dataset.names, dataset.datasets) if len(d) == 0]
        if empty:
            raise ValueError(f"mix sources {empty} have no samples in this split")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        self.num_samples_total = num_samples
        self.num_samples = -(-num_samples // num_replicas)
        self.total_size = self.num_samples * num_replicas

    def epoch_indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        sources = torch.multinomial(
            self.weights, self.num_samples_total, replacement=True, generator=g
        ).tolist()
        mix: MixDataset = self.dataset
        orders = [torch.randperm(len(d), generator=g).tolist() for d in mix.datasets]
        taken = [0] * len(orders)
        indices = []
        for s in sources:
            # cycle through each source's own shuffle so a small source repeats only when exhausted
            indices.append(mix.offsets[s] + orders[s][taken[s] % len(orders[s])])
            taken[s] += 1
        return indices


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from torch's per-worker seed (itself from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
