"""Map-style Datasets over prepared volumes: one generic ``RecordDataset`` and the standalone QA reader.

Every reader turns a split file into ``Record`` rows; ``RecordDataset`` loads a row's volume (memory
mapped ``.npy``), picks the wording, augments at train time and returns the contract item
(`data.sample.Sample`, docs/architecture.md "Samples and batches").
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from m3d_lit.data.augment import VolumeAugment, sample_seed
from m3d_lit.data.sample import Sample
from m3d_lit.errors import InputError
from m3d_lit.jsonl import read_jsonl

__all__ = [
    "Record",
    "SampleKey",
    "SampleText",
    "finish_sample",
    "RecordDataset",
    "QAJsonlDataset",
    "load_prepared_volume",
    "read_prepared_array",
    "check_paths",
    "read_qa_jsonl",
    "swap_images",
]

QA_KEYS = ("id", "image", "question", "answer", "kind")
SHOWN_BAD_PATHS = 5


@dataclass(frozen=True)
class Record:
    """One sample before loading.

    ``question`` and ``answer`` hold wordings: index 0 is canonical (val/test), training draws one per
    sample. When ``negative`` is set (M3D-Seg) the mask decides: an empty mask gives a ``negative``
    answer and no mask. When ``answer_file`` is set (M3D-Cap) the answer is that text file's content.
    """

    id: str
    image: Path
    question: tuple[str, ...]
    answer: tuple[str, ...]
    kind: str
    dataset: str
    source: Path
    mask: Path | None = None
    negative: tuple[str, ...] = ()
    answer_file: Path | None = None

    def paths(self) -> list[Path]:
        return [p for p in (self.image, self.mask, self.answer_file) if p is not None]


class SampleKey(NamedTuple):
    """What the samplers yield: the index plus the epoch, which seeds augmentation in any worker."""

    index: int
    epoch: int


def read_prepared_array(path: Path) -> np.ndarray:
    """A prepared ``.npy`` volume (or mask) as a memory-mapped 1 x D x H x W array in its stored dtype."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read as .npy: {err}") from err
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[0] != 1:
        raise InputError(path, f"expected a 1 x D x H x W volume, got shape {array.shape}")
    return array


def load_prepared_volume(path: Path, widen: bool = True) -> torch.Tensor:
    """A prepared ``.npy`` volume (or mask) as a 1 x D x H x W tensor (memory mapped).

    Args:
        path: the ``.npy`` file.
        widen: float32 whatever was stored; False keeps a float16 cache float16 (training batches carry
            it so, and the model widens it on the device). Other dtypes (uint8 masks) become float32.
    """
    array = read_prepared_array(path)
    keep = not widen and array.dtype in (np.float16, np.float32)
    return torch.from_numpy(np.array(array, dtype=array.dtype if keep else np.float32))


def _unreadable(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    if path.suffix != ".npy":
        return None if os.access(path, os.R_OK) else "unreadable"
    try:
        np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        return f"unreadable ({type(err).__name__})"
    return None


def check_paths(records: Iterable[Record]) -> None:
    """Raise ONE InputError if any file named by a split file (image, mask, text) is missing or unreadable."""
    pairs = [(r.source, p) for r in records for p in r.paths()]
    # a scan serves several rows (CQ500: six questions): each distinct file is opened once
    problems = {p: _unreadable(p) for p in dict.fromkeys(p for _, p in pairs)}
    bad = [(src, p, problems[p]) for src, p in pairs if problems[p] is not None]
    if not bad:
        return
    sources = sorted({str(src) for src, _, _ in bad})
    shown = "; ".join(f"{p} ({why})" for _, p, why in bad[:SHOWN_BAD_PATHS])
    also = f" (split files involved: {', '.join(sources)})" if len(sources) > 1 else ""
    raise InputError(
        bad[0][0], f"{len(bad)} files named here are missing or unreadable{also}, first: {shown}"
    )


def read_qa_jsonl(path: Path) -> list[Record]:
    """Rows of a ``prepare`` QA file (``qa_<split>.jsonl``); paths are relative to its folder."""
    path = Path(path)
    records = []
    for number, obj in read_jsonl(path):
        missing = [k for k in QA_KEYS if not isinstance(obj.get(k), str) or not obj[k]]
        if missing:
            raise InputError(path, f"line {number} lacks non-empty string fields {missing}")
        mask = obj.get("mask")
        records.append(
            Record(
                id=str(obj.get("qid") or obj["id"]),
                image=path.parent / obj["image"],
                question=(obj["question"],),
                answer=(obj["answer"],),
                kind=obj["kind"],
                dataset=str(obj.get("dataset", path.parent.name)),
                source=path,
                mask=None if not mask else path.parent / mask,
            )
        )
    return records


class RecordDataset(Dataset):
    """Loads ``Record`` rows as contract items; no sample is ever skipped or substituted.

    Args:
        records: the rows.
        train: draw wordings per sample (else the canonical ones) and apply ``augment``.
        augment: train-time augmentation, or None.
        seed: with the epoch and index, fixes every random draw of a sample.
        img_size: if given, every volume must be 1 x D x H x W with this (D, H, W).
        blank_images: return zero volumes of the same shape (the image-ablation control).
        blank_prob: with ``train``, the chance that a sample without a mask gets a zero volume (image
            dropout); drawn from the sample's own seed.
    """

    def __init__(
        self,
        records: Sequence[Record],
        train: bool = False,
        augment: VolumeAugment | None = None,
        seed: int = 0,
        img_size: Sequence[int] | None = None,
        blank_images: bool = False,
        blank_prob: float = 0.0,
    ) -> None:
        self.records = list(records)
        self.train = train
        self.augment = augment if train else None
        self.seed = seed
        self.img_size = None if img_size is None else tuple(int(s) for s in img_size)
        self.blank_images = blank_images
        self.blank_prob = blank_prob if train else 0.0

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """Each sample's text length in characters (question and answer, canonical wording; an answer
        file's size), what grouping by length sorts by: a proxy for its tokens, read without the volumes."""
        return [
            len(r.question[0]) + (r.answer_file.stat().st_size if r.answer_file else len(r.answer[0]))
            for r in self.records
        ]

    def _volume(self, path: Path) -> torch.Tensor:
        volume = load_prepared_volume(path, widen=False)
        if self.img_size is not None and tuple(volume.shape[1:]) != self.img_size:
            raise InputError(
                path, f"volume shape {tuple(volume.shape)} differs from img_size {self.img_size}"
            )
        return torch.zeros_like(volume) if self.blank_images else volume

    def __getitem__(self, key: int | SampleKey) -> Sample:
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        record = self.records[index]
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index)) if self.train else None
        image = self._volume(record.image)
        mask = None if record.mask is None else (load_prepared_volume(record.mask) > 0).float()
        if mask is not None and mask.shape != image.shape:
            raise InputError(
                record.mask, f"mask shape {tuple(mask.shape)} differs from image {tuple(image.shape)}"
            )
        answers = record.answer if record.answer_file is None else (_read_text(record.answer_file),)
        if record.negative and mask is not None and not bool(mask.any()):
            answers, mask = record.negative, None
        text = SampleText(record.id, record.question, answers, record.kind, record.dataset)
        return finish_sample(text, image, mask, rng, self.augment, self.blank_prob)


class SampleText(NamedTuple):
    """The text side of one row, every wording kept (index 0 canonical)."""

    id: str
    question: tuple[str, ...]
    answer: tuple[str, ...]
    kind: str
    dataset: str


def finish_sample(
    text: SampleText,
    image: torch.Tensor,
    mask: torch.Tensor | None,
    rng: np.random.Generator | None,
    augment: VolumeAugment | None = None,
    blank_prob: float = 0.0,
) -> Sample:
    """Augment, blank and pick the wordings of one loaded row, drawing from ``rng`` in one fixed order
    (augmentation seed, blank draw, question, answer), so every Dataset that seeds ``rng`` from (seed,
    epoch, index) yields the same sample for the same row; ``rng`` None: canonical wordings, no draws."""
    if augment is not None and rng is not None:
        image, mask = augment(image, mask, int(rng.integers(2**32)))
    if blank_prob and rng is not None and mask is None and rng.random() < blank_prob:
        image = torch.zeros_like(image)
    return {
        "id": text.id,
        "image": image,
        "question": _pick(text.question, rng),
        "answer": _pick(text.answer, rng),
        "kind": text.kind,
        "mask": mask,
        "dataset": text.dataset,
    }


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read the text: {err}") from err
    if not text:
        raise InputError(path, "the text is empty")
    return text


def _pick(options: tuple[str, ...], rng: np.random.Generator | None) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def swap_images(records: Sequence[Record], seed: int = 0) -> list[Record]:
    """The records with every scan replaced by another scan of the same list (never its own).

    The distinct images are put in a seeded random order and each takes the next one's place, so the
    swap is a derangement: questions, answers and masks keep their own scan's truth.
    """
    images = sorted({record.image for record in records})
    if len(images) < 2:
        raise ValueError(f"swapping scans needs at least 2 distinct images, got {len(images)}")
    order = [images[i] for i in np.random.default_rng(seed).permutation(len(images))]
    other = {image: order[(i + 1) % len(order)] for i, image in enumerate(order)}
    return [replace(record, image=other[record.image]) for record in records]


class QAJsonlDataset(RecordDataset):
    """One ``qa_<split>.jsonl`` of ``m3d-lit prepare``, standalone (``m3d-lit eval``); no augmentation.

    Args:
        path: the QA file; its image and mask paths are relative to its folder and checked here.
        img_size: if given, every volume must have this (D, H, W).
        blank_images: return zero volumes (the image-ablation control).
        swapped_images: give every question another scan of the file (`swap_images`): a control that
            stays among real head CTs, where a zero volume is far from anything the model has seen.
    """

    def __init__(
        self,
        path: str | Path,
        img_size: Sequence[int] | None = None,
        blank_images: bool = False,
        swapped_images: bool = False,
    ) -> None:
        if blank_images and swapped_images:
            raise ValueError("choose blank_images or swapped_images, not both")
        records = read_qa_jsonl(Path(path))
        check_paths(records)
        if swapped_images:
            records = swap_images(records)
        super().__init__(records, train=False, img_size=img_size, blank_images=blank_images)
