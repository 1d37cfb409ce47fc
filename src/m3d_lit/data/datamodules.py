"""LightningDataModules: one per data source, plus the weighted mix for stage 3.

Each has a YAML in ``datamodules/`` (a LightningCLI ``data:`` group). The task hands over its collator
with ``set_collator`` in its ``setup()``; every dataloader uses it. Splits are ``train``/``val``/``test``; ``fit`` reads train and
val, ``validate`` val, ``test`` and ``predict`` test. Every file a split names is checked in ``setup()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from m3d_lit.data.augment import ALL_AXES, BRAIN_CT_FLIP_AXES, VolumeAugment
from m3d_lit.data.datasets import Record, RecordDataset, check_paths, read_qa_jsonl
from m3d_lit.data.provenance import files_fingerprint, merge_sources, prepared_settings, volume_size
from m3d_lit.data.records import (
    positioning_records,
    read_m3d_cap,
    read_m3d_seg,
    read_m3d_vqa,
    read_reports,
    seg_class,
)
from m3d_lit.data.sample import Collator
from m3d_lit.data.sampling import EpochSampler, MixDataset, MixSampler, ResumableDataLoader, seed_worker
from m3d_lit.errors import InputError

__all__ = [
    "BaseDataModule",
    "M3DCapDataModule",
    "M3DVQADataModule",
    "M3DSegDataModule",
    "BrainCTQADataModule",
    "MixDataModule",
]

SPLITS_BY_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class BaseDataModule(L.LightningDataModule):
    """Shared loading: split records -> checked ``RecordDataset`` -> seeded, DDP-sharded DataLoaders.

    Args:
        batch_size: samples per batch per device.
        num_workers: DataLoader worker processes.
        seed: fixes shuffling, wording draws and augmentation per (epoch, index).
        augment: apply train-time augmentation (never at val/test).
        pin_memory: pin batches in page-locked memory (GPU runs).
        flip_axes: spatial axes (0 = D, 1 = H, 2 = W) that augmentation may mirror.
        blank_prob: train-time image dropout: the chance that a training sample without a mask gets an
            all-zero volume (its question and answer kept), so the model learns to answer an empty scan
            from the question alone, as the `--blank-images` control then measures. 0 turns it off.
        shuffle: reshuffle the training samples every epoch; false keeps the split files' order.
        group_by_length: make each training step's batches (on all ranks) of samples of similar text
            length (`sampling.group_by_length`), so that mixed sources (long captions, short questions)
            are not padded to each other; the samples of a batch are then no longer a uniform draw.
    """

    def __init__(
        self,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
        flip_axes: tuple[int, ...] = ALL_AXES,
        blank_prob: float = 0.0,
        shuffle: bool = True,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        if not 0.0 <= blank_prob < 1.0:
            raise ValueError(f"blank_prob must be in [0, 1), got {blank_prob}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = augment
        self.pin_memory = pin_memory
        self.flip_axes = tuple(flip_axes)
        self.blank_prob = blank_prob
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.collate_fn: Collator | None = None
        self.datasets: dict[str, Dataset] = {}
        self.unconfigured: set[str] = set()
        self._train_loader: DataLoader | None = None
        self._loader_state: dict[str, Any] | None = None
        self.data_files: set[Path] = set()

    # The window a source's volumes were made with, where the module knows it without a settings file
    # (M3D-Data ships its volumes min-maxed: `none`); None: unknown.
    volume_window: str | None = None

    @property
    def preprocessing(self) -> dict[str, dict[str, Any]]:
        """Per training source (a record's `dataset`), how its scans became volumes:
        `{"size": [D, H, W] or None, "window": name or None}` (`data/provenance.py`). Checkpoints record
        it, so inference reads new scans as these were read. Here: each source's first volume's size."""
        found: dict[str, dict[str, Any]] = {}
        for dataset in self.datasets.values():
            for record in getattr(dataset, "records", ()):
                if record.dataset not in found:
                    found[record.dataset] = {"size": volume_size(record.image), "window": self.volume_window}
        return found

    def fingerprint(self) -> str | None:
        """A hash of the split files read so far and of the settings beside them (`data/provenance.py`)."""
        return files_fingerprint(self.data_files)

    def set_collator(self, collate: Collator) -> None:
        """Take the collator the task builds from its model (`make_collator`); the task calls this in its
        `setup()`, before any dataloader is requested."""
        self.collate_fn = collate

    def read_split(self, split: str) -> list[Record] | None:
        """The rows of ``split`` (``train``/``val``/``test``), or None when that split is not configured."""
        raise NotImplementedError(f"{type(self).__name__} must implement read_split")

    def build_dataset(self, split: str) -> Dataset | None:
        records = self.read_split(split)
        if records is None:
            return None
        check_paths(records)
        self.data_files.update(record.source for record in records)
        train = split == "train"
        augment = VolumeAugment(flip_axes=self.flip_axes) if train and self.augment else None
        return RecordDataset(
            records, train=train, augment=augment, seed=self.seed, blank_prob=self.blank_prob
        )

    def setup(self, stage: str | None = None) -> None:
        splits = SPLITS_BY_STAGE.get(stage or "fit")
        if splits is None:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(SPLITS_BY_STAGE)}")
        for split in splits:
            if split not in self.datasets and split not in self.unconfigured:
                dataset = self.build_dataset(split)
                if dataset is None:
                    self.unconfigured.add(split)
                else:
                    self.datasets[split] = dataset
        if "train" in splits and not len(self.datasets.get("train", ())):
            # Lightning would run an empty epoch and exit 0, having trained nothing
            raise InputError(
                self.data_location(),
                "has no training samples (no train split, or an empty one): give the folder `m3d-lit "
                "prepare` wrote (its qa_train.jsonl, or reports.jsonl for mode report)",
            )

    def data_location(self) -> str:
        """What this module reads, for messages: its roots, input folders, root or JSON file."""
        for name in ("roots", "input_dirs", "root", "json_path"):
            value = getattr(self, name, None)
            if value:
                return ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        return type(self).__name__

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def grouping(self, dataset: Dataset) -> dict[str, Any]:
        """The training sampler's length-grouping arguments (none unless `group_by_length`)."""
        if not self.group_by_length:
            return {}
        return {"lengths": dataset.lengths(), "group_size": self.batch_size * self._ranks()[0]}

    def train_sampler(self, dataset: Dataset) -> EpochSampler:
        replicas, rank = self._ranks()
        grouping = self.grouping(dataset)
        return EpochSampler(
            dataset, num_replicas=replicas, rank=rank, shuffle=self.shuffle, seed=self.seed, **grouping
        )

    def eval_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP each val/test sample goes to exactly one rank (Lightning's sampler repeats samples to
        even the ranks out, biasing epoch metrics); a set smaller than the rank count is left to Lightning."""
        replicas, rank = self._ranks()
        if replicas <= 1 or len(dataset) < replicas:
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)

    def _loader(self, split: str) -> DataLoader | list:
        if self.collate_fn is None:
            raise RuntimeError(
                f"{type(self).__name__}.collate_fn is not set: the task hands it over in its setup()"
                " (datamodule.set_collator(make_collator(model))) before any dataloader is requested"
            )
        if split in self.unconfigured:
            return []  # Lightning runs no loop over an empty list of loaders
        if split not in self.datasets:
            raise RuntimeError(f"split {split!r} is not set up: call setup() with the matching stage first")
        dataset = self.datasets[split]
        sampler = self.train_sampler(dataset) if split == "train" else self.eval_sampler(dataset)
        generator = torch.Generator().manual_seed(self.seed + self._ranks()[1])
        # the training loader records its place in the epoch so a mid-epoch checkpoint resumes exactly
        loader_class = ResumableDataLoader if split == "train" else DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            # a last training batch of one sample breaks batch statistics (and a contrastive loss)
            drop_last=split == "train",
            worker_init_fn=seed_worker,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader | list:
        loader = self._loader("train")
        if isinstance(loader, DataLoader) and hasattr(loader, "load_state_dict"):
            self._train_loader = loader
            if self._loader_state is not None:
                loader.load_state_dict(self._loader_state)
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, saved in checkpoints beside Lightning's own copy of it.

        Lightning restores a loader's state only where it builds the loader after reading the checkpoint;
        with ``max_epochs`` set it builds it earlier (to count the steps of the LR schedule) and the state
        is dropped. A DataModule's state is restored before that, so the loader starts from it either way.
        """
        loader = self._train_loader
        return {} if loader is None else {"train_loader": loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_state = state_dict.get("train_loader")
        if self._train_loader is not None and self._loader_state is not None:
            self._train_loader.load_state_dict(self._loader_state)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("test")


class M3DCapDataModule(BaseDataModule):
    """M3D-Cap image-report pairs; the question is a caption prompt (several at train, the first at eval).

    Args:
        root: folder the JSON's relative ``image``/``text`` paths start from.
        json_path: the M3D-Cap JSON with split keys.
        train_split: JSON key of the training split.
        val_split: JSON key of the validation split (None: no validation).
        test_split: JSON key of the test split (None: no test).
        **kwargs: ``BaseDataModule`` arguments.
    """

    volume_window = "none"  # M3D-Data volumes come min-maxed over their range by M3D

    def __init__(
        self,
        root: str,
        json_path: str,
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = "test",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root, self.json_path = Path(root), Path(json_path)
        self.split_keys = {"train": train_split, "val": val_split, "test": test_split}

    def read_split(self, split: str) -> list[Record] | None:
        key = self.split_keys[split]
        if key is None:
            return None
        return read_m3d_cap(self.json_path, self.root, key)


class M3DVQADataModule(BaseDataModule):
    """M3D-VQA question-answer pairs, open or closed (``<q> Choices: A. x B. y C. z D. w`` -> ``A. x``).

    Args:
        root: folder the CSV's ``Image Path`` column starts from.
        train_csv: training CSV.
        val_csv: validation CSV (None: no validation).
        test_csv: test CSV (None: no test).
        mode: ``open`` or ``closed``.
        **kwargs: ``BaseDataModule`` arguments.
    """

    volume_window = "none"  # M3D-Data volumes come min-maxed over their range by M3D

    def __init__(
        self,
        root: str,
        train_csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        mode: Literal["open", "closed"] = "closed",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in ("open", "closed"):
            raise ValueError(f"mode must be 'open' or 'closed', got {mode!r}")
        self.root, self.mode = Path(root), mode
        self.csvs = {"train": train_csv, "val": val_csv, "test": test_csv}

    def read_split(self, split: str) -> list[Record] | None:
        path = self.csvs[split]
        return None if path is None else read_m3d_vqa(Path(path), self.root, self.mode)


class M3DSegDataModule(BaseDataModule):
    """M3D-Seg referring segmentation: ``Can you segment the <class>?`` -> ``It is [SEG].`` or a negative.

    Args:
        root: M3D-Seg folder holding ``<dataset>/<dataset>.json``.
        datasets: dataset folder names, e.g. ``["0000", "0003"]``.
        train_split: JSON key of the training split.
        val_split: JSON key of the validation split (None: no validation).
        test_split: JSON key of the test split (None: no test).
        positioning: also box questions (kinds ``rec``/``reg``) for every non-empty class mask.
        **kwargs: ``BaseDataModule`` arguments.
    """

    volume_window = "none"  # M3D-Data volumes come min-maxed over their range by M3D

    def __init__(
        self,
        root: str,
        datasets: list[str],
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = "test",
        positioning: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not datasets:
            raise ValueError("datasets must name at least one M3D-Seg dataset folder")
        self.root, self.dataset_names = Path(root), list(datasets)
        self.split_keys = {"train": train_split, "val": val_split, "test": test_split}
        self.positioning = positioning

    def read_split(self, split: str) -> list[Record] | None:
        key = self.split_keys[split]
        if key is None:
            return None
        records = [r for name in self.dataset_names for r in read_m3d_seg(self.root, name, key)]
        return records + positioning_records(records, seg_class) if self.positioning else records


class BrainCTQADataModule(BaseDataModule):
    """The ``m3d-lit prepare`` output of one or more brain-CT datasets (CQ500, PhysioNet).

    ``mode="qa"`` reads ``qa_<split>.jsonl`` (masks loaded for seg samples); ``mode="report"`` reads
    ``reports.jsonl`` as image-report pairs (question: a caption prompt, kind ``caption``) for stages
    1 and 2. A QA split whose file is absent in every root is not configured; absent in only some
    roots it is an error.

    Augmentation mirrors no axis by default (``flip_axes=()``): a mirror swaps the patient's left and
    right, and the answers name the side of a bleed.

    Args:
        roots: ``prepare`` output folders.
        mode: ``qa`` or ``report``.
        flip_axes: axes augmentation may mirror; keep W (2) out unless no answer names a side.
        positioning: in ``qa`` mode, also box questions (kinds ``rec``/``reg``) about the hemorrhage
            for every non-empty mask (PhysioNet masks outline any hemorrhage).
        **kwargs: other ``BaseDataModule`` arguments.
    """

    def __init__(
        self,
        roots: list[str],
        mode: Literal["qa", "report"] = "qa",
        flip_axes: tuple[int, ...] = BRAIN_CT_FLIP_AXES,
        positioning: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(flip_axes=flip_axes, **kwargs)
        if not roots:
            raise ValueError("roots must name at least one prepare output folder")
        if mode not in ("qa", "report"):
            raise ValueError(f"mode must be 'qa' or 'report', got {mode!r}")
        if positioning and mode != "qa":
            raise ValueError(f"positioning needs mode 'qa' (the masks are in the QA files), got {mode!r}")
        self.roots, self.mode, self.positioning = [Path(r) for r in roots], mode, positioning

    @property
    def preprocessing(self) -> dict[str, dict[str, Any]]:
        """Per source (the `dataset` each root's `prepare.json` names) its size and window; a root without
        `prepare.json` gives its records' source with its first volume's size and an unknown window."""
        known = [
            {str(settings.get("dataset") or root.name): settings}
            for root in self.roots
            if (settings := prepared_settings(root)) is not None
        ]
        named = {name for part in known for name in part}
        guessed = {k: v for k, v in super().preprocessing.items() if k not in named}
        return merge_sources([guessed, *known], self.roots[0])

    def read_split(self, split: str) -> list[Record] | None:
        if self.mode == "report":
            files = [root / "reports.jsonl" for root in self.roots]
        else:
            files = [root / f"qa_{split}.jsonl" for root in self.roots]
        missing = [f for f in files if not f.is_file()]
        if self.mode == "qa" and len(missing) == len(files):
            return None
        if missing:
            why = "other roots have this split" if self.mode == "qa" else "report mode reads it"
            raise InputError(missing[0], f"is missing ({why}): run `m3d-lit prepare` for this folder")
        if self.mode == "report":
            return [r for f in files for r in read_reports(f, split)]
        records = [r for f in files for r in read_qa_jsonl(f)]
        return records + positioning_records(records, _hemorrhage) if self.positioning else records


def _hemorrhage(record: Record) -> str:
    return "hemorrhage"


class MixDataModule(BaseDataModule):
    """Stage 3 mixture: each training batch draws its samples from the sources by weight.

    The draws depend only on (seed, epoch). Val/test run over every source's val/test set in full.
    Each source keeps its own augmentation settings; its batch size and workers are not used.

    Args:
        sources: name -> DataModule.
        weights: name -> positive sampling weight (same names as ``sources``).
        samples_per_epoch: training samples per epoch over all ranks (None: the sources' total).
        batch_size: samples per batch per device.
        num_workers: DataLoader worker processes.
        seed: fixes the draws per epoch.
        pin_memory: pin batches in page-locked memory.
        group_by_length: each training step's batches made of samples of similar text length
            (`BaseDataModule`): a caption source mixed with question sources then pads little.
    """

    def __init__(
        self,
        sources: dict[str, BaseDataModule],
        weights: dict[str, float],
        samples_per_epoch: int | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        group_by_length: bool = False,
    ) -> None:
        super().__init__(
            batch_size,
            num_workers,
            seed,
            augment=False,
            pin_memory=pin_memory,
            flip_axes=(),
            group_by_length=group_by_length,
        )
        if not sources or set(sources) != set(weights):
            raise ValueError(f"weights {sorted(weights)} must name exactly the sources {sorted(sources)}")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"weights must be positive, got {bad}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.sources, self.weights, self.samples_per_epoch = dict(sources), dict(weights), samples_per_epoch

    @property
    def preprocessing(self) -> dict[str, dict[str, Any]]:
        """Every source module's, merged; a source named twice with other settings is refused."""
        return merge_sources((source.preprocessing for source in self.sources.values()), "data.sources")

    def fingerprint(self) -> str | None:
        files = set(self.data_files)
        for source in self.sources.values():
            files |= source.data_files
        return files_fingerprint(files)

    def build_dataset(self, split: str) -> Dataset | None:
        stage = {"train": "fit", "val": "fit", "test": "test"}[split]
        parts = {}
        for name, source in self.sources.items():
            source.setup(stage)
            if split in source.datasets:
                parts[name] = source.datasets[split]
        if split == "train" and set(parts) != set(self.sources):
            raise ValueError(f"mix sources {sorted(set(self.sources) - set(parts))} have no train split")
        return MixDataset(parts) if parts else None

    def train_sampler(self, dataset: Dataset) -> EpochSampler:
        replicas, rank = self._ranks()
        weights = [self.weights[name] for name in dataset.names]
        num = self.samples_per_epoch or len(dataset)
        grouping = self.grouping(dataset)
        return MixSampler(dataset, weights, num, num_replicas=replicas, rank=rank, seed=self.seed, **grouping)
