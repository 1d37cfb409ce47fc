"""Questions and answers, findings reports and patient-level splits of a prepared source.

QA line (docs/architecture.md "Prepared data"): `id`, `qid` (`<id>:<question key>`, unique per line),
`image`, `question`, `answer`, `kind`, `label`, `mask` (seg only), `dataset`, `patient`. What the
questions ask and how `label` reads is the source's (`m3d_lit.data.sources`): CQ500 adds `votes`,
reader -> {finding: 0/1}; here are the splits and the files, the same for every source.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m3d_lit.atomic import write_text
from m3d_lit.data.sources import get_source
from m3d_lit.errors import InputError

__all__ = ["SPLITS", "check_fractions", "make_splits", "write_qa"]

SPLITS = ("train", "val", "test")
_STRATIFY = "stratify"  # the label the splits are spread by: the source's `stratify_value`


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise InputError("--fractions", f"{tuple(fractions)} must be three non-negative numbers summing to 1")
    train, val, test = (float(f) for f in fractions)
    return train, val, test


def make_splits(
    labels_by_patient: Mapping[str, Mapping[str, int]],
    stratify_key: str,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Split patients into train/val/test, stratified by one label, reproducibly.

    Val and test sizes are rounded up, so even a few dozen patients give test >= its fraction.

    Args:
        labels_by_patient: patient id -> labels holding `stratify_key`.
        stratify_key: the label whose values are spread evenly over the splits.
        fractions: train, val, test shares (non-negative, summing to 1).
        seed: shuffles each stratum.
    """
    train_f, val_f, test_f = check_fractions(fractions)
    missing = [p for p, labels in labels_by_patient.items() if stratify_key not in labels]
    if missing:
        raise ValueError(f"patients {sorted(missing)[:5]} have no label {stratify_key!r}")
    n = len(labels_by_patient)
    n_test, n_val = math.ceil(test_f * n - 1e-9), math.ceil(val_f * n - 1e-9)
    if n - n_test - n_val < (1 if train_f > 0 else 0):
        raise InputError(
            "--fractions",
            f"{n} labelled patients are too few for train/val/test fractions {(train_f, val_f, test_f)}: "
            f"val and test take {n_val} and {n_test} (rounded up), leaving none for train; give val and test "
            "smaller shares, e.g. --fractions 1 0 0 puts every patient in train",
        )
    strata: dict[int, list[str]] = {}
    for patient in sorted(labels_by_patient):
        strata.setdefault(int(labels_by_patient[patient][stratify_key]), []).append(patient)
    rng = random.Random(seed)
    # Interleave the shuffled strata by relative position, so that every prefix is stratified.
    ranked = []
    for value, patients in sorted(strata.items()):
        rng.shuffle(patients)
        ranked += [((i + 0.5) / len(patients), value, p) for i, p in enumerate(patients)]
    order = [p for _, _, p in sorted(ranked)]
    return {
        "train": sorted(order[n_test + n_val :]),
        "val": sorted(order[n_test : n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def _hash_split(patient: str, seed: int, fractions: Sequence[float]) -> str:
    """A split for a patient added after the first run: fixed by (seed, id) alone, whatever else changes."""
    u = int(hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()[:12], 16) / 16**12
    _, val_f, test_f = fractions
    return "test" if u < test_f else "val" if u < test_f + val_f else "train"


def _load_splits(path: Path, known: set[str]) -> dict[str, list[str]]:
    try:
        saved = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read the saved splits: {exc}") from None
    if not isinstance(saved, dict) or set(saved) != set(SPLITS):
        raise InputError(path, f"expected an object with exactly the keys {list(SPLITS)}")
    if not all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in saved.values()):
        raise InputError(path, "every split must be a list of patient id strings")
    ids = [p for split in SPLITS for p in saved[split]]
    repeated = sorted(p for p, count in Counter(ids).items() if count > 1)
    if repeated:
        raise InputError(path, f"patients in more than one split (or twice): {repeated[:5]}")
    unknown = sorted(set(ids) - known)
    if unknown:
        raise InputError(path, f"{len(unknown)} patient(s) not in the label file, e.g. {unknown[:5]}")
    return {split: list(saved[split]) for split in SPLITS}


def _resolve_splits(
    path: Path, labels: dict[str, dict[str, int]], known: set[str], fractions: Sequence[float], seed: int
) -> dict[str, list[str]]:
    """Reuse `splits.json` when present (new patients added by `_hash_split`), else make fresh splits.

    Saved patients that are labelled but not prepared this time stay in their split, so a patient never
    moves between splits across runs.
    """
    if not path.exists():
        return make_splits(labels, _STRATIFY, fractions, seed)
    splits = _load_splits(path, known)
    assigned = {p for patients in splits.values() for p in patients}
    for patient in sorted(set(labels) - assigned):
        splits[_hash_split(patient, seed, fractions)].append(patient)
    return {split: sorted(splits[split]) for split in SPLITS}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _warn_unmatched(label_path: Path, unlabeled: list[str], unprepared: list[str]) -> None:
    if unlabeled:
        warnings.warn(
            f"{len(unlabeled)} prepared id(s) have no labels in {label_path} and get no questions: "
            f"{unlabeled[:10]}",
            stacklevel=3,
        )
    if unprepared:
        warnings.warn(
            f"{len(unprepared)} labelled id(s) in {label_path} were not prepared and get no questions: "
            f"{unprepared[:10]}",
            stacklevel=3,
        )


def write_qa(
    dataset: str,
    raw_root: Path,
    out_dir: Path,
    ids: list[str],
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seg: bool = True,
    options: Mapping[str, Any] | None = None,
) -> dict:
    """Write `qa_{train,val,test}.jsonl`, `splits.json` and `reports.jsonl` into `out_dir`.

    Args:
        dataset: a source name (`m3d_lit.data.sources.SOURCES`), e.g. "cq500" (reads `raw_root/reads.csv`).
        raw_root: the raw dataset folder.
        out_dir: the `prepare` output folder (`images/<id>.npy`, `masks/<id>.npy` where the source has them).
        ids: the prepared ids; only those with labels get questions, the others are warned about.
        seed: picks the training paraphrases and the first split; later runs reuse `splits.json`.
        fractions: train, val, test shares of patients for the first split.
        seg: write the segmentation samples of a source with masks too.
        options: the source's own options, as `prepare` got them (the folder source's label files).

    Returns:
        {"samples": {split: n}, "patients": {split: n}, "unlabeled": [...], "unprepared": [...]}.
    """
    source = get_source(dataset)
    raw_root, out_dir = Path(raw_root), Path(out_dir)
    label_path, records = source.load_labels(raw_root, dict(options or {}))
    prepared = set(ids)
    usable = sorted(prepared & set(records))
    unlabeled, unprepared = sorted(prepared - set(records)), sorted(set(records) - prepared)
    _warn_unmatched(label_path, unlabeled, unprepared)
    if not usable:
        raise InputError(
            label_path, f"none of the {len(prepared)} prepared ids has labels, e.g. {unlabeled[:5]}"
        )
    source.match_prepared(raw_root, out_dir, {p: records[p] for p in usable})
    labels = {p: {_STRATIFY: source.stratify_value(records[p])} for p in usable}
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = _resolve_splits(out_dir / "splits.json", labels, set(records), fractions, seed)
    split_of = {p: split for split, patients in splits.items() for p in patients}
    qa: dict[str, list[dict]] = {split: [] for split in SPLITS}
    reports = []
    for pid in usable:
        split = split_of[pid]
        train = split == "train"
        rng = random.Random(f"{seed}:{pid}") if train else None
        qa[split] += source.build_samples(pid, records[pid], rng, seg=seg)
        text = source.report_text(records[pid], random.Random(f"{seed}:{pid}:report") if train else None)
        reports.append(
            {"id": pid, "image": f"images/{pid}.npy", "text": text, "split": split, "dataset": dataset}
        )
    for split in SPLITS:
        write_text(out_dir / f"qa_{split}.jsonl", _jsonl(qa[split]))
    write_text(out_dir / "reports.jsonl", _jsonl(reports))
    write_text(out_dir / "splits.json", json.dumps(splits, indent=1) + "\n")
    return {
        "samples": {split: len(qa[split]) for split in SPLITS},
        "patients": {split: sum(split_of[p] == split for p in usable) for split in SPLITS},
        "unlabeled": unlabeled,
        "unprepared": unprepared,
    }
