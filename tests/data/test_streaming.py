"""Streaming data: `m3d-lit optimize` writes LitData chunks, `StreamingDataModule` reads the same samples the
file-based modules give, the order covers every row once per plan whatever the rank count, a resumed loader
continues the stream exactly, and bad input is one line naming the setting."""

from __future__ import annotations

import json
import os
from importlib.metadata import requires, version
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement

from m3d_lit.cli import main
from m3d_lit.data.datamodules import BrainCTQADataModule, M3DSegDataModule
from m3d_lit.data.datasets import SampleKey
from m3d_lit.data.stream_format import MANIFEST
from m3d_lit.data.stream_sampling import RowKey, SourceRows, StreamLoader, StreamSampler, epoch_plan
from m3d_lit.data.streaming import StreamingDataModule
from m3d_lit.errors import InputError


def test_litdata_finds_every_requirement_but_torchvision() -> None:
    """`make setup` installs litdata with --no-deps (its torchvision requirement would replace the CPU torch
    with a CUDA build), so setup must install each other requirement it declares: a missing one fails
    streaming at its first import on a fresh machine."""
    for line in requires("litdata") or []:
        needed = Requirement(line)
        if needed.name == "torchvision" or (needed.marker and not needed.marker.evaluate({"extra": ""})):
            continue
        version(needed.name)  # PackageNotFoundError: setup did not install it


DRAWS = {"seed": 3, "augment": True, "flip_axes": (0, 1, 2), "blank_prob": 0.3}


@pytest.fixture
def chunks(brainct_data: dict[str, Path], tmp_path: Path) -> Path:
    prepared = [str(brainct_data[n]) for n in ("cq500", "physionet")]
    assert main(["optimize", *prepared, "--out", str(tmp_path / "chunks"), "--workers", "2"]) == 0
    return tmp_path / "chunks"


def test_optimize_stores_each_scan_once_with_its_rows_and_masks_only_for_segmentation(chunks: Path) -> None:
    manifest = json.loads((chunks / "physionet" / MANIFEST).read_text())
    train = manifest["splits"]["train"]
    assert train["items"] == 2 and train["dtype"] == "float16" and train["shape"] == [1, 8, 16, 16]
    assert {m: len(t["item"]) for m, t in train["rows"].items()} == {"qa": 6, "report": 2}
    data = StreamingDataModule([str(chunks / "physionet")], mode="qa")
    data.setup("fit")
    reader = data.datasets["train"]._reader(0)
    items = [reader[i] for i in range(train["items"])]
    # both scans have a seg row: the first a mask with a bleed, the second an empty one (a "no" answer)
    assert [tuple(item["masks"].shape) for item in items] == [(1, 1, 8, 16, 16)] * 2
    assert [len(json.loads(item["rows"])) for item in items] == [4, 4]  # 3 questions and the report
    cq500 = json.loads((chunks / "cq500" / MANIFEST).read_text())["splits"]["train"]
    assert cq500["bytes"] < 2 * (8 * 16 * 16 * 2 + 1000)  # two float16 volumes, no mask


@pytest.mark.parametrize("mode", ["qa", "report"])
def test_streaming_rows_equal_the_file_modules_rows(chunks, brainct_data, mode: str) -> None:
    roots = [str(brainct_data[n]) for n in ("cq500", "physionet")]
    streamed = StreamingDataModule([str(chunks / "cq500"), str(chunks / "physionet")], mode=mode, **DRAWS)
    files = BrainCTQADataModule(roots, mode=mode, **DRAWS)
    streamed.setup("fit"), files.setup("fit")
    ours, theirs = streamed.datasets["train"], files.datasets["train"]
    assert len(ours) == len(theirs)
    for epoch in (0, 1):
        for index in range(len(theirs)):
            source = int(index >= ours.offsets[1])
            _same(ours[RowKey(source, index - ours.offsets[source], epoch)], theirs[SampleKey(index, epoch)])
    for index in range(len(files.datasets["val"])):
        _same(streamed.datasets["val"][index], files.datasets["val"][index])


def test_m3d_seg_negatives_are_decided_when_optimizing(m3d_seg_data, tmp_path: Path) -> None:
    recipe = tmp_path / "m3d_seg.yaml"
    args = {"root": str(m3d_seg_data["root"]), "datasets": m3d_seg_data["datasets"], "val_split": None}
    recipe.write_text(
        json.dumps({"class_path": "m3d_lit.data.datamodules.M3DSegDataModule", "init_args": args})
    )
    assert main(["optimize", "--recipe", str(recipe), "--out", str(tmp_path / "chunks")]) == 0
    streamed = StreamingDataModule([str(tmp_path / "chunks" / "m3d_seg")], **DRAWS)
    files = M3DSegDataModule(**args, **DRAWS)
    streamed.setup("fit"), files.setup("fit")
    negatives = 0
    for index in range(len(files.datasets["train"])):
        ours = streamed.datasets["train"][RowKey(0, index, 2)]
        _same(ours, files.datasets["train"][SampleKey(index, 2)])
        negatives += ours["mask"] is None
    assert negatives > 0


def _same(a: dict, b: dict) -> None:
    assert (a["id"], a["question"], a["answer"], a["kind"], a["dataset"]) == (
        b["id"], b["question"], b["answer"], b["kind"], b["dataset"],
    )  # fmt: skip
    assert torch.equal(a["image"], b["image"]), a["id"]
    assert (a["mask"] is None) == (b["mask"] is None)
    assert a["mask"] is None or torch.equal(a["mask"], b["mask"])


def _sources() -> list[SourceRows]:
    # 23 rows over 5 chunks and 8 rows over 2 chunks
    return [SourceRows("a", np.repeat(np.arange(5), [5, 5, 5, 5, 3])), SourceRows("b", np.repeat([0, 1], 4))]


def test_an_epoch_plan_holds_every_row_once_and_shuffles_within_chunk_windows() -> None:
    labels, rows = epoch_plan(_sources(), seed=0, epoch=1, window=2)
    assert sorted(zip(labels.tolist(), rows.tolist())) == [(0, r) for r in range(23)] + [
        (1, r) for r in range(8)
    ]
    a = rows[labels == 0]
    chunks = _sources()[0].chunk_of_row[a]
    visits = sorted(range(5), key=lambda c: np.flatnonzero(chunks == c).min())
    for window in (visits[0:2], visits[2:4], visits[4:]):  # each window's rows are one run of the order
        where = np.flatnonzero(np.isin(chunks, window))
        assert where.max() - where.min() + 1 == len(where)
    assert sorted(a.tolist()) != a.tolist()
    again = epoch_plan(_sources(), seed=0, epoch=1, window=2)
    assert np.array_equal(again[1], rows) and not np.array_equal(
        epoch_plan(_sources(), 0, 2, window=2)[1], rows
    )
    labels, rows = epoch_plan(_sources(), seed=0, epoch=0, shuffle=False)
    assert labels.tolist() == [0] * 23 + [1] * 8 and rows.tolist() == list(range(23)) + list(range(8))
    labels, rows = epoch_plan(_sources(), seed=0, epoch=0, weights=[1.0, 3.0], samples=400)
    assert 0.65 < (labels == 1).mean() < 0.85  # 400 draws at p=0.75: 10 standard deviations wide
    assert set(rows[labels == 1].tolist()) == set(range(8))


class _Keys(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 31

    def __getitem__(self, key: RowKey) -> tuple:
        return tuple(key)


def _loader(replicas: int, rank: int, batch: int, workers: int = 0) -> StreamLoader:
    settings = {"seed": 1, "shuffle": True, "window": 2, "weights": None, "samples": None}
    sampler = StreamSampler(_Keys(), _sources(), settings, replicas, rank, batch)
    collate = lambda items: [tuple(i) for i in items]  # noqa: E731
    return StreamLoader(_Keys(), batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
                        identity={"seed": 1})  # fmt: skip


def _steps(loaders: list[StreamLoader], epoch: int, steps: int | None = None) -> list[tuple]:
    """The rows of `steps` global steps of an epoch, taken by the ranks together (rank order per step)."""
    for loader in loaders:
        loader.sampler.set_epoch(epoch)
    iterators = [iter(loader) for loader in loaders]
    seen: list[tuple] = []
    while steps is None or len(seen) < steps * len(loaders) * loaders[0].batch_size:
        try:
            batches = [next(it) for it in iterators]
        except StopIteration:  # what this epoch had left
            break
        seen += [row for batch in batches for row in batch]
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_see_every_row_of_an_epoch_once(workers: int) -> None:
    ranks = [_loader(2, r, 3, workers) for r in (0, 1)]
    seen = _steps(ranks, epoch=0)
    assert len(ranks[0]) == 31 // 6 and len(seen) == len(set(seen)) == 30
    assert {(s, r) for s, r, _ in seen} < {(0, r) for r in range(23)} | {(1, r) for r in range(8)}


def test_a_resumed_loader_continues_the_stream_on_another_rank_count_and_batch_size() -> None:
    alone = [_loader(1, 0, 2)]
    whole = _steps(alone, epoch=0) + _steps(alone, epoch=1)  # 15 + 15 batches: a stream across plans
    two = [_loader(2, r, 3) for r in (0, 1)]
    before = _steps(two, epoch=0, steps=3)
    state = json.loads(json.dumps(two[0].state_dict()))  # a checkpoint holds plain values
    assert state == {"position": 18, "epoch": 0, "taken": 3, "seed": 1}
    three = [_loader(3, r, 1) for r in range(3)]
    for loader in three:
        loader.load_state_dict(state)
    after = _steps(three, epoch=0)  # Lightning's epoch 0 goes on: 10 batches of 3 ranks, 3 taken before
    assert len(after) == (len(three[0]) - 3) * 3 == 21
    rest = _steps(three, epoch=1, steps=2)
    assert before + after + rest == whole[: len(before + after + rest)]
    with pytest.raises(ValueError, match="checkpoint's seed is 2, this run's is 1"):
        _loader(1, 0, 2).load_state_dict({**state, "seed": 2})


def test_bad_streaming_settings_are_one_line(chunks: Path, brainct_data, tmp_path: Path, monkeypatch) -> None:
    cases = [
        ({"input_dirs": [str(brainct_data["cq500"])]}, r"is not a streaming folder .* it is a `prepare` folder"),
        ({"input_dirs": [str(tmp_path)]}, r"is not a streaming folder \(no m3d_lit_stream\.json\): run `m3d-lit optimize"),
        ({"input_dirs": [str(chunks / "cq500")], "weights": {"cq500": 1.0, "ct": 1.0}},
         r"data\.weights: must give one positive weight to each source \['cq500'\] \(unknown: \['ct'\]"),
        ({"input_dirs": [str(chunks / "cq500")] * 2}, r"name the sources \['cq500'\] more than once"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            StreamingDataModule(**kwargs)
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    # no request leaves the machine: the instance-metadata lookup is off, the only endpoint is loopback
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(
        InputError, match=r"s3://bucket/cq500: no S3 credentials found: set AWS_ACCESS_KEY_ID"
    ):
        StreamingDataModule(["s3://bucket/cq500"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with pytest.raises(
        InputError, match=r"s3://bucket/cq500: cannot read m3d_lit_stream\.json \(EndpointConnectionError"
    ):
        StreamingDataModule(["s3://bucket/cq500"], storage_options={"endpoint_url": "http://127.0.0.1:9"})


def test_optimize_refuses_a_folder_that_holds_chunks_and_writes_nothing(chunks, brainct_data, capsys) -> None:
    manifest = chunks / "cq500" / MANIFEST
    before = (manifest.read_bytes(), sorted(p.name for p in chunks.rglob("*")))
    assert main(["optimize", str(brainct_data["cq500"]), "--out", str(chunks)]) == 2
    assert f"--out: {chunks / 'cq500'} already exists" in capsys.readouterr().err
    assert main(["optimize", str(brainct_data["cq500"]), "--out", str(chunks / "cq500")]) == 2
    assert "is itself a chunk folder (m3d_lit_stream.json)" in capsys.readouterr().err
    assert main(["optimize", str(chunks), "--out", str(chunks / "new")]) == 2
    assert "is not a `m3d-lit prepare` output" in capsys.readouterr().err
    assert (manifest.read_bytes(), sorted(p.name for p in chunks.rglob("*"))) == before
