"""Readers that turn the M3D-Data split files and brain-CT reports into ``Record`` rows, and their wordings.

Formats: the README's "Public datasets" (M3D-Data) and docs/architecture.md "Prepared data" (brain CT).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from m3d_lit.boxes import format_box, mask_to_box
from m3d_lit.data.datasets import Record
from m3d_lit.data.positioning import REC_ANSWERS, REC_QUESTIONS, REG_ANSWERS, REG_QUESTIONS
from m3d_lit.errors import InputError
from m3d_lit.jsonl import read_jsonl

__all__ = [
    "CAPTION_PROMPTS",
    "SEG_QUESTIONS",
    "SEG_ANSWERS",
    "SEG_NEGATIVES",
    "read_m3d_cap",
    "read_m3d_vqa",
    "read_m3d_seg",
    "read_reports",
    "positioning_records",
    "seg_class",
]

# index 0 is the canonical wording used at val/test
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the findings of this scan.",
    "Write a short report of the findings in this image.",
    "What are the findings in this medical image?",
    "Please caption this scan with its findings.",
    "Summarise what this CT volume shows.",
)
SEG_QUESTIONS: tuple[str, ...] = (
    "Can you segment the {cls} in this image?",
    "Please segment the {cls}.",
    "Where is the {cls} in this scan? Please output the mask.",
)
SEG_ANSWERS: tuple[str, ...] = ("It is [SEG].", "Sure, it is [SEG].", "The {cls} is [SEG].")
SEG_NEGATIVES: tuple[str, ...] = ("Sorry, there is no {cls}.", "There is no {cls} in this image.")
VQA_COLUMNS = (
    "Image Path",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(path, f"cannot read: {err}") from err
    except json.JSONDecodeError as err:
        raise InputError(path, f"is not JSON: {err.msg} at line {err.lineno}") from err


def _split_items(path: Path, data: Any, split: str) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(split), list):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(path, f"has no list under split key {split!r} (keys: {keys})")
    return data[split]


def read_m3d_cap(json_path: Path, root: Path, split: str) -> list[Record]:
    """M3D-Cap rows of one split; each answer is its report text file, read when the sample loads.

    Args:
        json_path: the M3D-Cap JSON (split keys -> lists of ``{"image", "text"}``).
        root: folder the relative ``image``/``text`` paths start from.
        split: the JSON key, e.g. ``train``, ``validation``, ``test``.
    """
    records = []
    for n, item in enumerate(_split_items(json_path, _load_json(json_path), split)):
        if not isinstance(item, dict) or not item.get("image") or not item.get("text"):
            raise InputError(json_path, f"item {n} of split {split!r} lacks 'image' or 'text'")
        records.append(
            Record(
                id=f"{split}/{n}",
                image=root / item["image"],
                question=CAPTION_PROMPTS,
                answer=(),
                kind="caption",
                dataset="m3d_cap",
                source=Path(json_path),
                answer_file=root / item["text"],
            )
        )
    return records


def _vqa_record(path: Path, root: Path, line: int, row: dict, mode: str) -> Record:
    empty = [c for c in VQA_COLUMNS if not (row.get(c) or "").strip()]
    needed = ["Image Path", "Question", "Answer"] if mode == "open" else list(VQA_COLUMNS)
    if any(c in empty for c in needed):
        raise InputError(path, f"row at line {line} has empty {[c for c in needed if c in empty]}")
    question, answer = row["Question"].strip(), row["Answer"].strip()
    if mode == "closed":
        choices = " ".join(f"{c}. {row[f'Choice {c}'].strip()}" for c in "ABCD")
        question = f"{question} Choices: {choices}"
        letter = row["Answer Choice"].strip()
        if letter not in ("A", "B", "C", "D"):
            raise InputError(path, f"row at line {line} has Answer Choice {letter!r}, not A-D")
        answer = f"{letter}. {row[f'Choice {letter}'].strip()}"
    return Record(
        f"{path.stem}/{line}", root / row["Image Path"].strip(), (question,), (answer,), mode, "m3d_vqa", path
    )


def read_m3d_vqa(csv_path: Path, root: Path, mode: Literal["open", "closed"]) -> list[Record]:
    """M3D-VQA rows; closed: ``<question> Choices: A. x B. y C. z D. w`` -> ``A. x``.

    Args:
        csv_path: one split's CSV (M3D-VQA's columns).
        root: folder the ``Image Path`` column starts from.
        mode: ``open`` (free answer) or ``closed`` (multiple choice).
    """
    csv_path = Path(csv_path)
    try:
        with csv_path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            absent = [c for c in VQA_COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                raise InputError(csv_path, f"lacks columns {absent}")
            return [_vqa_record(csv_path, root, reader.line_num, row, mode) for row in reader]
    except OSError as err:
        raise InputError(csv_path, f"cannot read: {err}") from err


def _class_name(mask_path: str, labels: dict[str, str]) -> str:
    stem = Path(mask_path).stem
    if not stem.startswith("mask_"):
        return ""
    cls = stem[len("mask_") :]
    return str(labels.get(cls, cls)).replace("_", " ")


def read_m3d_seg(root: Path, dataset: str, split: str) -> list[Record]:
    """M3D-Seg rows of one dataset: one row per (image, ``mask_<class>.npy``).

    ``<root>/<dataset>/<dataset>.json`` holds ``labels`` (optional, class id -> name) and split lists
    of ``{"image": path, "label": path | [paths]}``; paths are relative to ``root`` as in M3D-Seg.
    The answer is positive (``It is [SEG].``) or negative (``Sorry, there is no <class>.``) by
    whether the mask is empty, decided when the sample loads.
    """
    path = Path(root) / dataset / f"{dataset}.json"
    data = _load_json(path)
    labels = {str(k): str(v) for k, v in (data.get("labels") or {}).items()} if isinstance(data, dict) else {}
    records = []
    for n, item in enumerate(_split_items(path, data, split)):
        masks = item.get("label") if isinstance(item, dict) else None
        masks = [masks] if isinstance(masks, str) else masks
        if not item.get("image") or not masks:
            raise InputError(path, f"item {n} of split {split!r} lacks 'image' or 'label'")
        for mask in masks:
            cls = _class_name(mask, labels)
            if not cls:
                raise InputError(path, f"item {n}: mask {mask!r} is not named mask_<class>.npy")
            records.append(
                Record(
                    id=f"{dataset}/{split}/{n}/{cls}",
                    image=Path(root) / item["image"],
                    question=tuple(q.format(cls=cls) for q in SEG_QUESTIONS),
                    answer=tuple(a.format(cls=cls) for a in SEG_ANSWERS),
                    kind="seg",
                    dataset="m3d_seg",
                    source=path,
                    mask=Path(root) / mask,
                    negative=tuple(a.format(cls=cls) for a in SEG_NEGATIVES),
                )
            )
    return records


def read_reports(path: Path, split: str) -> list[Record]:
    """Image-report pairs of one split from ``reports.jsonl`` (kind ``caption``); paths relative to its folder."""
    path = Path(path)
    records = []
    for number, obj in read_jsonl(path):
        missing = [
            k for k in ("id", "image", "text", "split") if not isinstance(obj.get(k), str) or not obj[k]
        ]
        if missing:
            raise InputError(path, f"line {number} lacks non-empty string fields {missing}")
        if obj["split"] != split:
            continue
        dataset = str(obj.get("dataset", path.parent.name))
        records.append(
            Record(
                obj["id"],
                path.parent / obj["image"],
                CAPTION_PROMPTS,
                (obj["text"],),
                "caption",
                dataset,
                path,
            )
        )
    return records


def seg_class(record: Record) -> str:
    """The class an M3D-Seg row outlines (its id is ``<dataset>/<split>/<n>/<class>``)."""
    return record.id.split("/", 3)[3]


def _box_text(path: Path) -> str | None:
    try:
        mask = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read the mask as .npy: {err}") from err
    try:
        box = mask_to_box(np.asarray(mask) > 0)
    except ValueError as err:
        raise InputError(path, f"is not a 1 x D x H x W mask: {err}") from err
    return None if box is None else format_box(box)


def positioning_records(records: Iterable[Record], structure: Callable[[Record], str]) -> list[Record]:
    """Referring expression comprehension (kind ``rec``) and generation (``reg``) rows from masks.

    One pair per distinct mask file among ``records`` (rows without a mask are skipped; an empty mask
    has nothing to locate and gives none). The box is the mask's extent, written by ``format_box``;
    the wordings are ``m3d_lit.data.positioning``'s templates, the first canonical. Each mask is read
    once here, when the split is read.

    Args:
        records: rows of one split, e.g. M3D-Seg or brain-CT ``seg`` rows.
        structure: the name of what a row's mask outlines, e.g. ``seg_class`` or ``lambda r: "hemorrhage"``.
    """
    out, seen = [], set()
    for record in records:
        if record.mask is None or record.mask in seen:
            continue
        seen.add(record.mask)
        box = _box_text(record.mask)
        if box is None:
            continue
        name = " ".join(structure(record).split())
        common = {"image": record.image, "dataset": record.dataset, "source": record.source}
        rec_q = tuple(q.format(s=name) for q in REC_QUESTIONS)
        rec_a = tuple(a.format(s=name, box=box) for a in REC_ANSWERS)
        reg_q = tuple(q.format(box=box) for q in REG_QUESTIONS)
        reg_a = tuple(a.format(s=name) for a in REG_ANSWERS)
        out.append(Record(id=f"{record.id}/rec", question=rec_q, answer=rec_a, kind="rec", **common))
        out.append(Record(id=f"{record.id}/reg", question=reg_q, answer=reg_a, kind="reg", **common))
    return out
