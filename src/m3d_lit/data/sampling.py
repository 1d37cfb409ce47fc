"""Samplers that shard deterministically per epoch under DDP and tell each sample its epoch.

They subclass ``DistributedSampler`` so Lightning neither wraps nor replaces them, and it calls their
``set_epoch`` at every epoch start (also after a resume). Each yields ``SampleKey(index, epoch)`` so the
Dataset seeds a sample's augmentation from (seed, epoch, index) in whichever worker loads it.

``ResumableDataLoader`` makes a training loader resumable mid-epoch under Lightning's stateful-loader
protocol (Lightning calls ``state_dict``/``load_state_dict`` on the loader object itself, not on its
sampler): it records the epoch and how many batches the training loop took, and after a restore the
sampler starts right after them, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from m3d_lit.data.datasets import SampleKey
from m3d_lit.data.sample import Sample

__all__ = [
    "EpochSampler",
    "MixSampler",
    "MixDataset",
    "ResumableDataLoader",
    "group_by_length",
    "seed_worker",
]


def group_by_length(
    indices: Sequence[int], lengths: Sequence[int], group: int, window: int, generator: torch.Generator
) -> list[int]:
    """`indices` reordered so that each run of `group` consecutive indices has similar lengths.

    Windows of `window` groups are cut from the (already shuffled) order; inside a window the indices are
    sorted by length, longest first, and cut into groups; the groups of the whole epoch are then put in a
    random order, except that the longest group comes first (a batch that does not fit the memory fails
    at the first step, not hours later). The randomness of which samples meet stays that of the window,
    as in LLaVA's `group_by_modality_length` and Hugging Face's `LengthGroupedSampler`.

    Args:
        indices: the epoch's order (a permutation of, or draws from, the dataset's indices).
        lengths: the length of each dataset index (any unit; only the order matters).
        group: samples per training step over all ranks (batch size x ranks).
        window: groups per window: larger windows group more tightly and mix less.
        generator: draws the order of the groups.
    """
    span = group * window
    groups = []
    for start in range(0, len(indices), span):
        part = sorted(indices[start : start + span], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        groups += [part[i : i + group] for i in range(0, len(part), group)]
    if len(groups) < 2:
        return [i for g in groups for i in g]
    longest = max(range(len(groups)), key=lambda g: (len(groups[g]) == group, lengths[groups[g][0]]))
    rest = [g for k, g in enumerate(groups) if k != longest]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return groups[longest] + [i for k in order for i in rest[k]]


class EpochSampler(DistributedSampler):
    """A seeded shuffle (or the plain order) of one dataset, split evenly across ranks.

    With `lengths`, the shuffled order is grouped by length (`group_by_length`): the `group_size` samples
    of each step across all ranks then have similar lengths, so a batch of short questions is not padded
    to the length of a long caption, and no rank waits on another's longer rows. Rank r takes every r-th
    index of the epoch, so one step's batches on all ranks come from one group.

    Args:
        dataset: the map-style dataset.
        num_replicas: number of ranks (1 outside DDP).
        rank: this rank.
        shuffle: reshuffle each epoch from (seed, epoch).
        seed: shuffling seed, the same on every rank.
        lengths: one length per dataset index, to group by (None: no grouping).
        group_size: samples per step over all ranks (batch size x ranks); needed with `lengths`.
        window: steps per window of `group_by_length`.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        group_size: int = 0,
        window: int = 50,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside num_replicas {num_replicas}")
        if lengths is not None and (len(lengths) != len(dataset) or group_size < 1 or window < 1):
            raise ValueError(
                f"grouping by length needs one length per sample ({len(lengths)} for {len(dataset)}), "
                f"group_size >= 1 (got {group_size}) and window >= 1 (got {window})"
            )
        # drop_last=False: short ranks repeat the first indices so every rank runs the same step count
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0
        self.lengths, self.group_size, self.window = lengths, group_size, window

    def skip_next(self, count: int) -> None:
        """Start the next iteration after the first ``count`` indices of this rank (a resume)."""
        if count < 0:
            raise ValueError(f"cannot skip {count} indices")
        self.start = count

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "seed": int(self.seed), "num_replicas": int(self.num_replicas)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the epoch; a different seed or rank count would give other samples, so it is refused."""
        for key in ("seed", "num_replicas"):
            if key in state and int(state[key]) != int(getattr(self, key)):
                raise ValueError(
                    f"cannot resume the data order: the checkpoint's sampler has {key}={state[key]}, "
                    f"this run has {key}={getattr(self, key)}"
                )
        self.set_epoch(int(state["epoch"]))

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
        if self.lengths is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_919)
            indices = group_by_length(indices, self.lengths, self.group_size, self.window, generator)
        indices += (indices * (self.total_size // len(indices) + 1))[: self.total_size - len(indices)]
        mine = indices[self.rank : self.total_size : self.num_replicas][self.start :]
        self.start = 0
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

    def __getitem__(self, key: int | SampleKey) -> Sample:
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        source, local = self.locate(index)
        return self.datasets[source][SampleKey(local, epoch)]

    def lengths(self) -> list[int]:
        """Every source's `lengths()`, source after source."""
        return [n for dataset in self.datasets for n in dataset.lengths()]


class MixSampler(EpochSampler):
    """Draws ``num_samples`` per epoch: a source by weight, then the next item of that source's shuffle.

    Args:
        dataset: the ``MixDataset``.
        weights: one positive weight per source, in ``dataset.names`` order.
        num_samples: samples per epoch over all ranks.
        num_replicas: number of ranks.
        rank: this rank.
        seed: the draws depend only on (seed, epoch).
        **grouping: `lengths`, `group_size`, `window`: grouping by length, as `EpochSampler`.
    """

    def __init__(
        self,
        dataset: MixDataset,
        weights: Sequence[float],
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        **grouping: Any,
    ) -> None:
        if len(weights) != len(dataset.datasets) or min(weights, default=0) <= 0:
            raise ValueError(f"need one positive weight per source {dataset.names}, got {list(weights)}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        empty = [n for n, d in zip(dataset.names, dataset.datasets) if len(d) == 0]
        if empty:
            raise ValueError(f"mix sources {empty} have no samples in this split")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, **grouping)
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


class ResumableDataLoader(DataLoader):
    """A DataLoader over an ``EpochSampler`` whose position in the epoch survives a checkpoint.

    ``state_dict`` gives the sampler's epoch and the number of batches handed to the training loop in
    that epoch; ``load_state_dict`` makes the next iteration of that epoch start after those batches (the
    skipped samples are never loaded). Takes the arguments of ``DataLoader``; ``sampler`` must be an
    ``EpochSampler`` and ``batch_size`` set.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler) or self.batch_size is None:
            raise ValueError(
                f"ResumableDataLoader needs an EpochSampler and a batch_size, got {type(self.sampler).__name__}"
                f" and batch_size={self.batch_size}"
            )
        self.batches_taken = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler: EpochSampler = self.sampler
        self.batches_taken = 0
        if self._resume is not None and self._resume[0] == sampler.epoch:
            self.batches_taken = self._resume[1]
            sampler.skip_next(self.batches_taken * self.batch_size)
        self._resume = None
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            # counted when handed out: a checkpoint written during this batch counts it as taken
            self.batches_taken += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "batches_taken": self.batches_taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler: EpochSampler = self.sampler
        sampler.load_state_dict(state["sampler"])
        taken = int(state["batches_taken"])
        if taken >= len(self):  # saved on the last batch: the next epoch starts from its beginning
            sampler.set_epoch(sampler.epoch + 1)
            taken = 0
        self._resume = (sampler.epoch, taken)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from torch's per-worker seed (itself from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
