"""The order in which streaming rows are trained on, and a training loader that resumes it exactly.

The rows of every source form one endless stream of epoch plans. A plan (`epoch_plan`) depends only on
(seed, plan number, the sources' row counts and chunk layout, weights): never on the number of ranks or
workers. Each source's rows are shuffled chunk-window by chunk-window (its chunks in a seeded order,
``window`` chunks at a time, the rows of those chunks shuffled together), so a rank reads from a few
chunks at a time; without weights every row of every source comes once per plan, the sources
interleaved at random; with weights each draw picks a source by weight and takes the next row of that
source's order. Training step s hands the global batch at stream positions [s*W*B, (s+1)*W*B) to the W
ranks, B each, rank r the r-th block. The loader's state is the stream position after the last batch it
handed out, so a resumed run, on any number of ranks and with any batch size, continues exactly where the
checkpoint left the stream: no row is repeated or skipped. On a fixed rank count, a Lightning epoch is one
plan whenever the plan's rows fill whole global batches; otherwise the epochs shift along the stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["RowKey", "SourceRows", "StreamLoader", "StreamSampler", "epoch_plan", "source_order"]


class RowKey(NamedTuple):
    """What the streaming sampler yields: a source, a row of it (its position in the split's records) and
    the plan number, which seeds the row's wording and augmentation in any worker."""

    source: int
    row: int
    epoch: int


@dataclass(frozen=True)
class SourceRows:
    """One source's rows of the trained mode: the chunk each row's scan is stored in."""

    name: str
    chunk_of_row: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.chunk_of_row)


def source_order(source: SourceRows, seed: int, epoch: int, number: int, window: int) -> np.ndarray:
    """The rows of one source in plan `epoch`: chunks in a seeded order, `window` chunks at a time, the
    rows of each window shuffled among themselves."""
    rng = np.random.default_rng([seed, epoch, number])
    chunks = int(source.chunk_of_row.max()) + 1 if source.rows else 0
    place = np.empty(chunks, dtype=np.int64)
    place[rng.permutation(chunks)] = np.arange(chunks)
    windows = place[source.chunk_of_row] // max(1, window)
    return np.lexsort((rng.random(source.rows), windows))


def epoch_plan(
    sources: Sequence[SourceRows],
    seed: int,
    epoch: int,
    shuffle: bool = True,
    window: int = 4,
    weights: Sequence[float] | None = None,
    samples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(source, row) of every position of plan `epoch`; see the module docstring."""
    orders = [
        source_order(s, seed, epoch, i, window) if shuffle else np.arange(s.rows)
        for i, s in enumerate(sources)
    ]
    rng = np.random.default_rng([seed, epoch, len(sources)])
    if weights is None:
        labels = np.repeat(np.arange(len(sources)), [s.rows for s in sources])
        labels = rng.permutation(labels) if shuffle else labels
    else:
        p = np.asarray(weights, dtype=np.float64)
        total = samples or sum(s.rows for s in sources)
        labels = rng.choice(len(sources), size=total, p=p / p.sum())
    rows = np.empty(len(labels), dtype=np.int64)
    for i, order in enumerate(orders):
        where = np.flatnonzero(labels == i)
        # a source drawn more often than it has rows starts its order again
        rows[where] = order[np.arange(len(where)) % len(order)]
    return labels, rows


class _Plans:
    """The plans of a stream, the newest two kept (a global batch may straddle two plans)."""

    def __init__(self, settings: dict[str, Any], sources: Sequence[SourceRows]) -> None:
        self.settings, self.sources = settings, list(sources)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.length = len(self.plan(0)[0])

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self.cache:
            self.cache = {e: p for e, p in self.cache.items() if e >= epoch - 1}
            self.cache[epoch] = epoch_plan(self.sources, epoch=epoch, **self.settings)
        return self.cache[epoch]

    def key(self, position: int) -> RowKey:
        epoch, offset = divmod(position, self.length)
        labels, rows = self.plan(epoch)
        return RowKey(int(labels[offset]), int(rows[offset]), epoch)


class StreamSampler(DistributedSampler):
    """This rank's keys for ``batches`` global batches from stream position ``start`` (a DistributedSampler,
    so Lightning neither wraps nor replaces it).

    Args:
        dataset: the rows' dataset (its length is only reported).
        sources: the sources' rows, in the dataset's source order.
        settings: `epoch_plan` keywords: seed, shuffle, window, weights, samples.
        num_replicas: number of ranks.
        rank: this rank.
        batch_size: samples per batch per rank.
    """

    def __init__(
        self, dataset: Dataset, sources: Sequence[SourceRows], settings: dict[str, Any],
        num_replicas: int = 1, rank: int = 0, batch_size: int = 1,
    ) -> None:  # fmt: skip
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside num_replicas {num_replicas}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)
        self.plans = _Plans(settings, sources)
        self.batch_size = batch_size
        self.step = batch_size * num_replicas
        self.start, self.batches = 0, self.batches_per_epoch()

    def batches_per_epoch(self) -> int:
        """Global batches in one Lightning epoch: the plan's length in whole global batches (at least one)."""
        return max(1, self.plans.length // self.step)

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[RowKey]:
        first = self.start + self.rank * self.batch_size
        for b in range(self.batches):
            base = first + b * self.step
            yield from (self.plans.key(p) for p in range(base, base + self.batch_size))


class StreamLoader(DataLoader):
    """A DataLoader over a `StreamSampler` whose state is the stream position (Lightning saves and restores
    it, as it does for any loader with ``state_dict``/``load_state_dict``).

    Batches are counted when handed to the training loop (a sized loader, so Lightning fetches none ahead).
    ``identity`` (the plan settings and the sources' row counts) must match on resume: another plan
    would make the position mean other rows. Takes the arguments of `DataLoader`.
    """

    def __init__(self, *args: Any, identity: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, StreamSampler):
            raise ValueError(f"StreamLoader needs a StreamSampler, got {type(self.sampler).__name__}")
        self.identity = identity
        self.position, self.epoch, self.taken = 0, 0, 0
        self._resume: tuple[int, int] | None = None  # (Lightning epoch, batches it had taken)

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch()

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing is read before the first batch is asked for. Lightning creates the iterator
        # before it restores a checkpoint's loader state (and before it sets the epoch), so the position
        # and epoch are taken only then.
        sampler: StreamSampler = self.sampler
        self.epoch, self.taken = int(sampler.epoch), 0
        if self._resume is not None and self._resume[0] == self.epoch:
            self.taken = self._resume[1]
        self._resume = None
        sampler.start, sampler.batches = self.position, max(0, len(self) - self.taken)
        for batch in super().__iter__():
            self.position += sampler.step  # counted when handed out: a checkpoint now counts it as taken
            self.taken += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "epoch": self.epoch, "taken": self.taken, **self.identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self.identity.items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume the streaming order: the checkpoint's {key} is {state.get(key)!r}, this "
                    f"run's is {value!r}; resume with the same data settings, or start a new run"
                )
        self.position = int(state["position"])
        self._resume = (int(state["epoch"]), int(state["taken"]))
