"""Training from LitData chunks (`m3d-lit optimize`), local or in an object store: the ``streaming`` recipe.

At start-up each rank reads one manifest per source (`stream_format`), never the samples; a worker opens
a source's chunks (LitData's `StreamingDataset`) when it first reads from them. Rows come in the order of
`stream_sampling` (shuffled by chunk windows, sources mixed by weight, exactly resumable on any number of
ranks). A row becomes the same `Sample` the file-based `RecordDataset` gives for the same (seed, epoch,
index): the wording and augmentation draws go through the shared `datasets.finish_sample`, and a row's
index is its position in the concatenated split files of the sources, in `input_dirs` order.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from m3d_lit.data.augment import BRAIN_CT_FLIP_AXES, VolumeAugment, sample_seed
from m3d_lit.data.datamodules import BaseDataModule
from m3d_lit.data.datasets import SampleText, finish_sample
from m3d_lit.data.sample import Sample
from m3d_lit.data.sampling import seed_worker
from m3d_lit.data.stream_format import MODES, read_manifest, require_litdata
from m3d_lit.data.stream_sampling import RowKey, SourceRows, StreamLoader, StreamSampler
from m3d_lit.errors import InputError

__all__ = ["StreamingDataModule", "StreamRows"]


class StreamRows(Dataset):
    """The rows of one mode and split of several streaming sources; an int is a position in their
    concatenation (val/test), a `RowKey` a drawn training row.

    Args:
        dirs: the sources' folders or URLs.
        split: ``train``, ``val`` or ``test``.
        tables: per source, the manifest's row table of this split and mode (``item`` and ``slot`` lists).
        train: draw wordings, augmentation and image dropout per (seed, epoch, index); else canonical.
        augment: train-time augmentation, or None.
        seed: with the epoch and the row's index, fixes every draw.
        blank_prob: image dropout of rows without a mask (see `BaseDataModule`).
        reader_options: `StreamingDataset` keywords (cache_dir, max_cache_size, storage_options).
    """

    def __init__(
        self, dirs: list[str], split: str, tables: list[dict[str, list[int]]], train: bool = False,
        augment: VolumeAugment | None = None, seed: int = 0, blank_prob: float = 0.0,
        reader_options: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.dirs, self.split, self.train = list(dirs), split, train
        self.items = [np.asarray(t["item"], dtype=np.int64) for t in tables]
        self.slots = [np.asarray(t["slot"], dtype=np.int64) for t in tables]
        self.offsets = np.cumsum([0] + [len(i) for i in self.items]).tolist()
        self.augment = augment if train else None
        self.seed, self.blank_prob = seed, (blank_prob if train else 0.0)
        self.reader_options = dict(reader_options or {})
        self._readers: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_readers": {}}  # a worker opens its own readers

    def _reader(self, source: int) -> Any:
        if self._pid != os.getpid():  # a forked worker must not share its parent's open readers
            self._readers, self._pid = {}, os.getpid()
        if source not in self._readers:
            from litdata import StreamingDataset

            reader = StreamingDataset(f"{self.dirs[source].rstrip('/')}/{self.split}", **self.reader_options)
            # Whole chunks into the cache, not each item's bytes on demand (LitData's default for random
            # access): the other rows of a scan, drawn later in the same window, read them from there. The
            # public setter needs the cache that the first read creates, hence the attribute it sets.
            reader._on_demand_bytes = False
            self._readers[source] = reader
        return self._readers[source]

    def _locate(self, key: int | RowKey) -> tuple[int, int, int]:
        if isinstance(key, RowKey):
            return key.source, key.row, key.epoch
        index = int(key)
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        if not 0 <= source < len(self.items):
            raise IndexError(f"row {index} outside {len(self)} rows")
        return source, index - self.offsets[source], 0

    def __getitem__(self, key: int | RowKey) -> Sample:
        source, row, epoch = self._locate(key)
        item = self._reader(source)[int(self.items[source][row])]
        fields = json.loads(item["rows"])[int(self.slots[source][row])]
        image = torch.from_numpy(np.array(item["image"], dtype=np.float32))
        slot = int(fields["mask"])
        mask = None if slot < 0 else torch.from_numpy(np.array(item["masks"][slot] > 0, dtype=np.float32))
        index = self.offsets[source] + row  # the row's index in the file-based module: the same draws
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index)) if self.train else None
        text = SampleText(
            fields["id"],
            tuple(fields["question"]),
            tuple(fields["answer"]),
            fields["kind"],
            fields["dataset"],
        )
        return finish_sample(text, image, mask, rng, self.augment, self.blank_prob)


class StreamingDataModule(BaseDataModule):
    """Training, validation and test rows from `m3d-lit optimize` folders, local or in an object store.

    Args:
        input_dirs: the sources' folders (``DIR/<name>`` of `optimize`) or URLs (``s3://bucket/m3d/cq500``).
        mode: ``qa`` (questions and segmentation) or ``report`` (image-report pairs, stages 1 and 2).
        weights: source name -> positive weight: each training draw picks a source by weight (None:
            every row of every source once per epoch).
        samples_per_epoch: training rows per epoch with weights (None: all sources' rows).
        shuffle_window: chunks whose rows are shuffled together (more: better mixing, more cache).
        cache_dir: where chunks of a URL source are cached (None: LitData's default).
        max_cache_size: the chunk cache's limit, e.g. ``"200GB"`` (None: LitData's default).
        storage_options: the object store's client options, e.g. ``{endpoint_url: http://...}``.
        flip_axes: axes augmentation may mirror (default: none of brain CT's, whose answers name sides;
            M3D-Data sources allow [0, 1, 2]).
        **kwargs: ``BaseDataModule`` arguments (batch_size, num_workers, seed, augment, shuffle, ...).
    """

    def __init__(
        self, input_dirs: list[str], mode: Literal["qa", "report"] = "qa",
        weights: dict[str, float] | None = None, samples_per_epoch: int | None = None, shuffle_window: int = 4,
        cache_dir: str | None = None, max_cache_size: str | None = None,
        storage_options: dict[str, Any] | None = None, flip_axes: tuple[int, ...] = BRAIN_CT_FLIP_AXES, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(flip_axes=flip_axes, **kwargs)
        require_litdata("data")
        if not input_dirs:
            raise InputError("data.input_dirs", "is empty: name at least one `m3d-lit optimize` folder")
        if mode not in MODES:
            raise InputError("data.mode", f"{mode!r} is not one of {list(MODES)}")
        if shuffle_window < 1 or (samples_per_epoch is not None and samples_per_epoch < 1):
            raise InputError("data.shuffle_window/samples_per_epoch", "must be >= 1")
        self.input_dirs = [str(d) for d in input_dirs]
        self.mode, self.weights, self.samples_per_epoch = mode, weights, samples_per_epoch
        self.shuffle_window, self.storage_options = shuffle_window, dict(storage_options or {})
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "m3d_lit_stream"
        self.reader_options = {
            k: v for k, v in (("cache_dir", cache_dir), ("max_cache_size", max_cache_size),
                              ("storage_options", storage_options)) if v
        }  # fmt: skip
        self.manifests = [read_manifest(d, self.storage_options, self.cache_dir) for d in self.input_dirs]
        self.names = [str(m["name"]) for m in self.manifests]
        self._check_names()

    def _check_names(self) -> None:
        twice = sorted({n for n in self.names if self.names.count(n) > 1})
        if twice:
            raise InputError("data.input_dirs", f"name the sources {twice} more than once; give each once")
        if self.weights is None:
            return
        unknown, missing = set(self.weights) - set(self.names), set(self.names) - set(self.weights)
        bad = {k: w for k, w in self.weights.items() if not w > 0}
        if unknown or missing or bad:
            raise InputError(
                "data.weights",
                f"must give one positive weight to each source {self.names} (unknown: {sorted(unknown)}, "
                f"missing: {sorted(missing)}, not positive: {bad})",
            )

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        """The `prepare` settings of the sources (size, window), saved in checkpoints so `ask` reads alike."""
        settings = [m.get("preprocessing") for m in self.manifests if m.get("preprocessing")]
        if any(s != settings[0] for s in settings[1:]):
            raise InputError("data.input_dirs", f"prepare settings differ between sources: {settings}")
        return settings[0] if settings else None

    def _tables(self, split: str) -> list[dict[str, list[int]]] | None:
        tables = [m["splits"].get(split, {}).get("rows", {}).get(self.mode) for m in self.manifests]
        present = [t is not None and len(t["item"]) > 0 for t in tables]
        if split != "train" and not any(present):
            return None
        if not all(present):
            empty = [n for n, p in zip(self.names, present) if not p]
            raise InputError(
                "data.input_dirs",
                f"{empty} have no {self.mode} rows in the {split} split; drop them or use another data.mode",
            )
        return tables

    def build_dataset(self, split: str) -> Dataset | None:
        tables = self._tables(split)
        if tables is None:
            return None
        train = split == "train"
        augment = VolumeAugment(flip_axes=self.flip_axes) if train and self.augment else None
        return StreamRows(
            self.input_dirs, split, tables, train, augment, self.seed, self.blank_prob, self.reader_options
        )

    def _sources(self) -> list[SourceRows]:
        rows = []
        for name, manifest, items in zip(self.names, self.manifests, self.datasets["train"].items):
            chunks = np.repeat(np.arange(len(manifest["splits"]["train"]["chunks"])),
                               manifest["splits"]["train"]["chunks"])  # fmt: skip
            rows.append(SourceRows(name, chunks[items]))
        return rows

    def _loader(self, split: str) -> DataLoader | list:
        if split != "train" or self.collate_fn is None or "train" not in self.datasets:
            return super()._loader(
                split
            )  # val/test as the file-based modules; its errors say what is missing
        dataset = self.datasets["train"]
        replicas, rank = self._ranks()
        weights = None if self.weights is None else [float(self.weights[n]) for n in self.names]
        settings = {"seed": self.seed, "shuffle": self.shuffle, "window": self.shuffle_window,
                    "weights": weights, "samples": self.samples_per_epoch if weights else None}  # fmt: skip
        sources = self._sources()
        identity = {**settings, "mode": self.mode, "sources": [[s.name, s.rows] for s in sources]}
        return StreamLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=StreamSampler(dataset, sources, settings, replicas, rank, self.batch_size),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.seed + rank),
            persistent_workers=self.num_workers > 0,
            identity=identity,
        )
