"""Brain-CT questions and answers, findings reports and patient-level splits from the label files.

QA line (docs/architecture.md "Prepared data"): `id`, `qid` (`<id>:<question key>`, unique per line),
`image`, `question`, `answer`, `kind`, `label`, `mask` (seg only), `dataset`, `patient`. `label` holds the
asked findings with their 0/1 values (CQ500 names: ICH, IPH, ..., Fracture) and, for CQ500, `votes`:
reader -> {finding: 0/1} for the same findings.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import random
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from m3d_lit.atomic import write_text
from m3d_lit.data import phrasing
from m3d_lit.data.labels import CQ500_READERS, SLICE_FILE, read_cq500_reads, read_physionet_labels
from m3d_lit.data.phrasing import findings_report
from m3d_lit.errors import InputError

__all__ = [
    "SPLITS",
    "build_cq500_samples",
    "build_physionet_samples",
    "check_fractions",
    "cq500_findings",
    "findings_report",
    "make_splits",
    "physionet_findings",
    "write_qa",
]

SPLITS = ("train", "val", "test")
OPEN_CQ500 = ("ICH", *phrasing.HEMORRHAGE_TYPES, "BleedLocation-Left", "BleedLocation-Right")
# The main finding the splits are stratified by: ICH (CQ500 majority; PhysioNet any hemorrhage).
STRATIFY_KEY = "ICH"


def cq500_findings(record: Mapping) -> dict[str, int]:
    """The majority-of-readers findings of a `read_cq500_reads` record."""
    return dict(record["majority"])


def physionet_findings(record: Mapping) -> dict[str, int]:
    """A `read_physionet_labels` record in CQ500 finding names (no side, chronicity or mass effect)."""
    return {"ICH": record["hemorrhage"], **record["types"], "Fracture": record["fracture"]}


def _sample(dataset: str, sid: str, key: str, kind: str, question: str, answer: str, label: dict) -> dict:
    return {
        "id": sid,
        "qid": f"{sid}:{key}",
        "image": f"images/{sid}.npy",
        "question": question,
        "answer": answer,
        "kind": kind,
        "label": label,
        "dataset": dataset,
        "patient": sid,
    }


def build_cq500_samples(name: str, record: Mapping, rng: random.Random | None = None) -> list[dict]:
    """One open hemorrhage question (types and side) and five closed questions for one CQ500 scan.

    Args:
        name: the scan name, e.g. "CQ500-CT-427" (also the patient and the image file stem).
        record: a `read_cq500_reads` record; answers use the reader majority, `label.votes` keeps each vote.
        rng: picks the paraphrases (training); None gives the canonical wording.
    """
    majority, readers = record["majority"], record["readers"]

    def label(keys: Sequence[str]) -> dict:
        votes = {r: {k: readers[r][k] for k in keys} for r in CQ500_READERS}
        return {**{k: majority[k] for k in keys}, "votes": votes}

    samples = [
        _sample(
            "cq500",
            name,
            "hemorrhage",
            "open",
            phrasing.open_question(True, rng),
            phrasing.open_answer(majority, rng),
            label(OPEN_CQ500),
        )
    ]
    for finding in phrasing.CLOSED_FINDINGS:
        question = phrasing.closed_question(finding, rng)
        answer = phrasing.closed_answer(finding, majority[finding], rng)
        samples.append(_sample("cq500", name, finding, "closed", question, answer, label([finding])))
    return samples


def build_physionet_samples(
    pid: str, record: Mapping, rng: random.Random | None = None, seg: bool = True
) -> list[dict]:
    """An open hemorrhage question, a closed fracture question and (with `seg`) a segmentation sample.

    The first two are the paper's QA records for a PhysioNet patient; the segmentation sample trains the
    `[SEG]` path (stage 3) and is scored on its own (Dice), never with the text metrics.

    Args:
        pid: the 3-digit patient id, e.g. "049" (also the image and mask file stem).
        record: a `read_physionet_labels` record.
        rng: picks the paraphrases (training); None gives the canonical wording.
        seg: add the segmentation sample.
    """
    findings = physionet_findings(record)
    hemorrhage = {k: findings[k] for k in ("ICH", *phrasing.HEMORRHAGE_TYPES)}
    open_qa = (phrasing.open_question(False, rng), phrasing.open_answer(findings, rng))
    fracture_qa = (
        phrasing.closed_question("Fracture", rng),
        phrasing.closed_answer("Fracture", findings["Fracture"], rng),
    )
    samples = [
        _sample("physionet", pid, "hemorrhage", "open", *open_qa, hemorrhage),
        _sample("physionet", pid, "Fracture", "closed", *fracture_qa, {"Fracture": findings["Fracture"]}),
    ]
    if not seg:
        return samples
    seg_qa = (phrasing.seg_question(rng), phrasing.seg_answer(findings["ICH"], rng))
    segment = _sample("physionet", pid, "segment", "seg", *seg_qa, {"ICH": findings["ICH"]})
    # Negatives carry their (empty) mask too, so training also learns to predict nothing.
    segment["mask"] = f"masks/{pid}.npy"
    return samples + [segment]


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
        return make_splits(labels, STRATIFY_KEY, fractions, seed)
    splits = _load_splits(path, known)
    assigned = {p for patients in splits.values() for p in patients}
    for patient in sorted(set(labels) - assigned):
        splits[_hash_split(patient, seed, fractions)].append(patient)
    return {split: sorted(splits[split]) for split in SPLITS}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _load_labels(dataset: str, raw_root: Path) -> tuple[Path, dict[str, dict]]:
    if dataset == "cq500":
        return raw_root / "reads.csv", read_cq500_reads(raw_root / "reads.csv")
    if dataset == "physionet":
        return raw_root, read_physionet_labels(raw_root)
    raise ValueError(f"dataset {dataset!r} is not one of 'cq500', 'physionet'")


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


def _check_slice_counts(label_path: Path, manifest: Path, records: dict[str, dict]) -> None:
    """The per-slice CSV must label exactly the slices of each prepared NIfTI (`prepare`'s manifest)."""
    if not manifest.is_file():
        return
    with manifest.open(newline="", encoding="utf-8") as handle:
        depth = {row["id"]: int(row["orig_shape"].split("x")[0]) for row in csv.DictReader(handle)}
    for pid, record in records.items():
        if pid in depth and record["num_slices"] != depth[pid]:
            raise InputError(
                label_path,
                f"patient {pid}: {record['num_slices']} slices labelled, the NIfTI has {depth[pid]}",
            )


def write_qa(
    dataset: str,
    raw_root: Path,
    out_dir: Path,
    ids: list[str],
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seg: bool = True,
) -> dict:
    """Write `qa_{train,val,test}.jsonl`, `splits.json` and `reports.jsonl` into `out_dir`.

    Args:
        dataset: "cq500" (reads `raw_root/reads.csv`) or "physionet" (reads the CSVs in `raw_root`).
        raw_root: the raw dataset folder holding the label files.
        out_dir: the `prepare` output folder (`images/<id>.npy`, PhysioNet `masks/<id>.npy`).
        ids: the prepared ids; only those with labels get questions, the others are warned about.
        seed: picks the training paraphrases and the first split; later runs reuse `splits.json`.
        fractions: train, val, test shares of patients for the first split.
        seg: PhysioNet only: write each patient's segmentation sample too.

    Returns:
        {"samples": {split: n}, "patients": {split: n}, "unlabeled": [...], "unprepared": [...]}.
    """
    raw_root, out_dir = Path(raw_root), Path(out_dir)
    label_path, records = _load_labels(dataset, raw_root)
    findings = cq500_findings if dataset == "cq500" else physionet_findings
    build = build_cq500_samples if dataset == "cq500" else functools.partial(build_physionet_samples, seg=seg)
    prepared = set(ids)
    usable = sorted(prepared & set(records))
    unlabeled, unprepared = sorted(prepared - set(records)), sorted(set(records) - prepared)
    _warn_unmatched(label_path, unlabeled, unprepared)
    if not usable:
        raise InputError(
            label_path, f"none of the {len(prepared)} prepared ids has labels, e.g. {unlabeled[:5]}"
        )
    if dataset == "physionet":
        _check_slice_counts(raw_root / SLICE_FILE, out_dir / "manifest.csv", {p: records[p] for p in usable})
    labels = {p: {STRATIFY_KEY: findings(records[p])[STRATIFY_KEY]} for p in usable}
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = _resolve_splits(out_dir / "splits.json", labels, set(records), fractions, seed)
    split_of = {p: split for split, patients in splits.items() for p in patients}
    qa: dict[str, list[dict]] = {split: [] for split in SPLITS}
    reports = []
    for pid in usable:
        split = split_of[pid]
        train = split == "train"
        qa[split] += build(pid, records[pid], random.Random(f"{seed}:{pid}") if train else None)
        text = findings_report(
            findings(records[pid]), random.Random(f"{seed}:{pid}:report") if train else None
        )
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
