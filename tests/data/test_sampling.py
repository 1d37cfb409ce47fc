"""Grouping by length: each step's batches (on every rank) hold samples of similar length, every sample
of the epoch is still used once, the order is fixed by (seed, epoch), and a resumed loader continues it
exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from m3d_lit.data.datasets import SampleKey
from m3d_lit.data.sampling import EpochSampler, MixDataset, MixSampler, ResumableDataLoader, group_by_length

BATCH, RANKS = 4, 2


class _Texts(Dataset):
    """Short questions and long captions interleaved: sample i has length 10 + i % 7, or 300 + i if i % 3 == 0."""

    def __init__(self, n: int = 64) -> None:
        self.sizes = [300 + i if i % 3 == 0 else 10 + i % 7 for i in range(n)]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, key: SampleKey) -> int:
        return int(key.index)

    def lengths(self) -> list[int]:
        return list(self.sizes)


def _steps(data: _Texts, grouped: bool, epoch: int = 0) -> list[list[int]]:
    """Each training step's samples over both ranks (rank 0's batch, then rank 1's)."""
    # one window of 8 steps: the epoch's 21 long samples fill 2 steps and share a third with short ones
    grouping = {"lengths": data.lengths(), "group_size": BATCH * RANKS, "window": 8} if grouped else {}
    shards = []
    for rank in range(RANKS):
        sampler = EpochSampler(data, num_replicas=RANKS, rank=rank, seed=3, **grouping)
        sampler.set_epoch(epoch)
        shards.append([key.index for key in sampler])
    count = len(shards[0]) // BATCH  # drop_last: whole batches only
    return [[i for s in shards for i in s[k * BATCH : (k + 1) * BATCH]] for k in range(count)]


def _padding(data: _Texts, steps: list[list[int]]) -> float:
    """Tokens computed (every row padded to its batch's longest) over the tokens that are real."""
    computed = real = 0
    for step in steps:
        for batch in (step[:BATCH], step[BATCH:]):
            computed += BATCH * max(data.sizes[i] for i in batch)
            real += sum(data.sizes[i] for i in batch)
    return computed / real


def test_each_step_holds_samples_of_similar_length_and_the_epoch_is_kept() -> None:
    data = _Texts()
    plain, grouped = _steps(data, False), _steps(data, True)
    # the same samples are drawn in the epoch (the padded tail of the shards included)
    assert sorted(i for s in grouped for i in s) == sorted(i for s in plain for i in s)
    assert _padding(data, grouped) < 1.2 < 2.0 < _padding(data, plain)
    # the step with the longest rows comes first: memory runs out at step 1 or never
    assert max(data.sizes[i] for i in grouped[0]) == max(data.sizes)
    # fixed by (seed, epoch), and another epoch is another order
    assert _steps(data, True) == grouped and _steps(data, True, epoch=1) != grouped


@pytest.mark.parametrize("workers", [0, 2])
def test_a_grouped_loader_resumes_exactly(workers: int) -> None:
    data = _Texts()

    def loader() -> ResumableDataLoader:
        sampler = EpochSampler(data, seed=1, lengths=data.lengths(), group_size=BATCH, window=3)
        return ResumableDataLoader(data, batch_size=BATCH, sampler=sampler, num_workers=workers)

    full = [b.tolist() for b in loader()]
    interrupted, taken = loader(), []
    for batch in interrupted:
        taken.append(batch.tolist())
        if len(taken) == 5:
            state = json.loads(json.dumps(interrupted.state_dict()))
            break
    resumed = loader()
    resumed.load_state_dict(state)
    assert taken + [b.tolist() for b in resumed] == full


def test_mix_sampler_groups_the_draws_of_its_sources() -> None:
    short, long = _Texts(30), _Texts(30)
    long.sizes = [400 + i for i in range(30)]
    mix = MixDataset({"vqa": short, "cap": long})
    lengths = mix.lengths()
    sampler = MixSampler(mix, [1.0, 1.0], num_samples=64, seed=2, lengths=lengths, group_size=8, window=8)
    order = [key.index for key in sampler]
    plain = [key.index for key in MixSampler(mix, [1.0, 1.0], num_samples=64, seed=2)]
    assert sorted(order) == sorted(plain)
    spans = [
        max(lengths[i] for i in order[k : k + 8]) - min(lengths[i] for i in order[k : k + 8])
        for k in range(0, 64, 8)
    ]
    mixed = [
        max(lengths[i] for i in plain[k : k + 8]) - min(lengths[i] for i in plain[k : k + 8])
        for k in range(0, 64, 8)
    ]
    assert sum(spans) < sum(mixed) / 2


def test_group_by_length_checks_its_arguments() -> None:
    data = _Texts(10)
    with pytest.raises(ValueError, match="one length per sample"):
        EpochSampler(data, lengths=[1, 2], group_size=2)
    with pytest.raises(ValueError, match="group_size >= 1"):
        EpochSampler(data, lengths=data.lengths())
    generator = torch.Generator().manual_seed(0)
    assert group_by_length([3], [5, 5, 5, 5], group=2, window=2, generator=generator) == [3]
