"""QA construction: wording, labels, findings reports, splits and the files `write_qa` writes."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import SHARED
from hypothesis import given, settings
from hypothesis import strategies as st

from m3d_lit.data.phrasing import findings_report
from m3d_lit.data.qa import make_splits, write_qa
from m3d_lit.data.sources.cq500 import CQ500_FINDINGS, CQ500_READERS, build_cq500_samples, read_cq500_reads
from m3d_lit.data.sources.physionet import PHYSIONET_TYPES, build_physionet_samples
from m3d_lit.errors import InputError

REAL = SHARED / "data" / "labels"
QA_KEYS = {"id", "qid", "image", "question", "answer", "kind", "label", "dataset", "patient"}
CLOSED = ["ChronicBleed", "Fracture", "CalvarialFracture", "MassEffect", "MidlineShift"]


def cq500_record(majority: set[str], votes: dict[str, set[str]] | None = None) -> dict:
    """A record as `read_cq500_reads` returns it; readers default to all agreeing with `majority`."""
    votes = votes or {r: majority for r in CQ500_READERS}
    return {
        "category": "B1",
        "readers": {r: {f: int(f in votes.get(r, set())) for f in CQ500_FINDINGS} for r in CQ500_READERS},
        "majority": {f: int(f in majority) for f in CQ500_FINDINGS},
    }


def physionet_record(types: set[str], fracture: int = 0) -> dict:
    flags = {k: int(k in types) for k in PHYSIONET_TYPES}
    one_slice = {**flags, "hemorrhage": int(bool(types)), "fracture": fracture}
    return {
        "types": flags,
        "hemorrhage": int(bool(types)),
        "fracture": fracture,
        "num_slices": 1,
        "slices": {1: one_slice},
    }


@pytest.mark.parametrize(
    ("positives", "answer"),
    [
        (set(), "No intracranial hemorrhage."),
        ({"ICH", "IPH", "BleedLocation-Left"}, "Intraparenchymal hemorrhage on the left side."),
        ({"ICH", "SDH", "EDH", "BleedLocation-Right"}, "Subdural and epidural hemorrhage on the right side."),
        (
            {"ICH", "IVH", "SAH", "IPH", "BleedLocation-Left", "BleedLocation-Right"},
            "Intraparenchymal, intraventricular and subarachnoid hemorrhage on both sides.",
        ),
        ({"ICH"}, "Intracranial hemorrhage."),
        ({"ICH", "SAH"}, "Subarachnoid hemorrhage."),
    ],
)
def test_cq500_open_answer_states_types_and_side(positives, answer):
    samples = build_cq500_samples("CQ500-CT-7", cq500_record(positives))
    assert len(samples) == 6 and [s["kind"] for s in samples] == ["open"] + ["closed"] * 5
    assert samples[0]["question"] == "Is there intracranial hemorrhage? If so, what type and on which side?"
    assert samples[0]["answer"] == answer
    assert samples[0]["label"]["ICH"] == int("ICH" in positives)
    for s in samples:
        assert QA_KEYS == set(s) and s["image"] == "images/CQ500-CT-7.npy" and s["patient"] == "CQ500-CT-7"
    assert len({s["qid"] for s in samples}) == 6


@pytest.mark.parametrize("finding", CLOSED)
def test_cq500_closed_answers_follow_the_majority(finding):
    votes = {"R1": {finding}, "R2": {finding}, "R3": set()}
    positive = {s["qid"]: s for s in build_cq500_samples("s", cq500_record({finding}, votes))}[f"s:{finding}"]
    negative = {s["qid"]: s for s in build_cq500_samples("s", cq500_record(set(), {"R3": {finding}}))}[
        f"s:{finding}"
    ]
    assert positive["answer"].split(",")[0] == "Yes" and negative["answer"].split(",")[0] == "No"
    assert positive["label"] == {
        finding: 1,
        "votes": {"R1": {finding: 1}, "R2": {finding: 1}, "R3": {finding: 0}},
    }
    assert negative["label"][finding] == 0 and negative["label"]["votes"]["R3"] == {finding: 1}


def test_cq500_reader_disagreement_keeps_votes_in_open_label():
    votes = {"R1": {"ICH", "IPH", "SDH"}, "R2": {"ICH", "IPH"}, "R3": {"ICH", "SDH", "BleedLocation-Right"}}
    record = cq500_record({"ICH", "IPH", "SDH"}, votes)
    open_sample = build_cq500_samples("s", record)[0]
    assert open_sample["answer"] == "Intraparenchymal and subdural hemorrhage."
    assert open_sample["label"]["votes"]["R3"]["BleedLocation-Right"] == 1
    assert open_sample["label"]["BleedLocation-Right"] == 0


def test_training_wording_varies_by_seed_but_keeps_the_facts():
    record = cq500_record({"ICH", "EDH", "BleedLocation-Left", "MassEffect"})
    runs = [build_cq500_samples("s", record, random.Random(seed)) for seed in range(40)]
    assert runs[3] == build_cq500_samples("s", record, random.Random(3))
    assert len({r[0]["question"] for r in runs}) > 1 and len({r[0]["answer"] for r in runs}) > 1
    for samples in runs:
        assert "epidural hemorrhage on the left side" in samples[0]["answer"].lower()
        answers = {s["qid"]: s["answer"] for s in samples}
        assert answers["s:MassEffect"].startswith("Yes") and answers["s:Fracture"].startswith("No")


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_physionet_samples(seed):
    rng = None if seed is None else random.Random(seed)
    positive = build_physionet_samples("049", physionet_record({"EDH", "SDH"}, fracture=1), rng)
    negative = build_physionet_samples("095", physionet_record(set()), rng)
    assert [s["kind"] for s in positive] == ["open", "closed", "seg"]
    assert "subdural and epidural hemorrhage" in positive[0]["answer"].lower()
    assert "no" in negative[0]["answer"].lower().split()
    assert positive[1]["answer"].startswith("Yes") and negative[1]["answer"].startswith("No")
    assert "[SEG]" in positive[2]["answer"] and "[SEG]" not in negative[2]["answer"]
    assert positive[2]["mask"] == "masks/049.npy" and negative[2]["mask"] == "masks/095.npy"
    assert all("mask" not in s for s in positive[:2] + negative[:2])
    assert positive[0]["label"] == {"ICH": 1, "IPH": 0, "IVH": 0, "SDH": 1, "EDH": 1, "SAH": 0}
    if seed is None:
        assert positive[2]["question"] == "Segment the hemorrhage."
        assert positive[2]["answer"] == "Here is the hemorrhage: [SEG]."


@pytest.mark.parametrize(
    ("positives", "report"),
    [
        (set(), "Normal scan: no hemorrhage, fracture, mass effect or midline shift."),
        (
            {"ICH", "SDH", "BleedLocation-Left", "BleedLocation-Right", "ChronicBleed"},
            "Subdural hemorrhage on both sides. Chronic bleed.",
        ),
        ({"Fracture", "CalvarialFracture"}, "No intracranial hemorrhage. Calvarial fracture."),
        ({"Fracture", "OtherFracture"}, "No intracranial hemorrhage. Non-calvarial fracture."),
        (
            {"Fracture", "CalvarialFracture", "OtherFracture"},
            "No intracranial hemorrhage. Calvarial fracture and another fracture.",
        ),
        (
            {"ICH", "IVH", "MassEffect", "MidlineShift"},
            "Intraventricular hemorrhage. Mass effect with midline shift.",
        ),
        ({"MidlineShift"}, "No intracranial hemorrhage. Midline shift."),
    ],
)
def test_findings_report_names_every_positive_finding(positives, report):
    findings = cq500_record(positives)["majority"]
    assert findings_report(findings) == report
    for seed in range(10):
        text = findings_report(findings, random.Random(seed)).lower()
        for word in ("subdural", "chronic", "calvarial", "mass effect", "midline", "both sides"):
            assert (word in text) == (word in report.lower())


def test_physionet_report_mentions_only_assessed_findings():
    assert findings_report({"ICH": 0, "IPH": 0, "Fracture": 0}) == "Normal scan: no hemorrhage or fracture."
    assert findings_report({"ICH": 1, "EDH": 1, "Fracture": 1}) == "Epidural hemorrhage. Fracture."


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 160), positive_share=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_make_splits_is_a_stratified_partition(n, positive_share, seed):
    labels = {f"p{i:03d}": {"ICH": int(i < positive_share * n)} for i in range(n)}
    splits = make_splits(labels, "ICH", seed=seed)
    assert list(splits) == ["train", "val", "test"]
    members = [p for split in splits.values() for p in split]
    assert sorted(members) == sorted(labels)
    assert len(splits["test"]) >= 0.2 * n and len(splits["val"]) >= 0.1 * n and splits["train"]
    positives = sum(v["ICH"] for v in labels.values())
    test_positives = sum(labels[p]["ICH"] for p in splits["test"])
    assert abs(test_positives - len(splits["test"]) * positives / n) <= 1
    assert splits == make_splits(labels, "ICH", seed=seed)


def test_make_splits_seed_and_argument_checks():
    labels = {f"p{i}": {"ICH": i % 3 == 0} for i in range(60)}
    assert make_splits(labels, "ICH", seed=0) != make_splits(labels, "ICH", seed=1)
    with pytest.raises(ValueError, match=r"--fractions: \(0.5, 0.1, 0.2\)"):
        make_splits(labels, "ICH", (0.5, 0.1, 0.2))
    with pytest.raises(ValueError, match="2 labelled patients are too few"):
        make_splits({"a": {"ICH": 0}, "b": {"ICH": 1}}, "ICH")
    with pytest.raises(ValueError, match="have no label 'SDH'"):
        make_splits(labels, "SDH")


def cq500_raw(tmp_path: Path, n: int) -> Path:
    """A reads.csv of n scans cycling through the findings, readers disagreeing on every third scan."""
    header = ["name", "Category"] + [f"{r}:{f}" for r in CQ500_READERS for f in CQ500_FINDINGS]
    lines = [",".join(header)]
    for i in range(n):
        positive = set() if i % 2 else {"ICH", CQ500_FINDINGS[1 + i % 13]}
        votes = {r: positive if (i % 3 or r != "R3") else set(CQ500_FINDINGS) for r in CQ500_READERS}
        cells = [str(int(f in votes[r])) for r in CQ500_READERS for f in CQ500_FINDINGS]
        lines.append(",".join([f"CQ500-CT-{i}", "B1", *cells]))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "reads.csv").write_text("\n".join(lines))
    return raw


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_qa_cq500_files(tmp_path):
    raw, out = cq500_raw(tmp_path, 30), tmp_path / "out"
    ids = [f"CQ500-CT-{i}" for i in range(28)] + ["CQ500-CT-999"]
    with pytest.warns(UserWarning) as caught:
        summary = write_qa("cq500", raw, out, ids, seed=5)
    messages = " ".join(str(w.message) for w in caught)
    assert "CQ500-CT-999" in messages and "CQ500-CT-28" in messages
    assert summary["unlabeled"] == ["CQ500-CT-999"] and summary["unprepared"] == [
        "CQ500-CT-28",
        "CQ500-CT-29",
    ]
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(p for s in splits.values() for p in s) == sorted(ids[:-1])
    assert len(splits["test"]) >= 0.2 * 28
    reports = {r["id"]: r for r in read_jsonl(out / "reports.jsonl")}
    for split, patients in splits.items():
        rows = read_jsonl(out / f"qa_{split}.jsonl")
        assert len(rows) == 6 * len(patients) == summary["samples"][split]
        assert {r["patient"] for r in rows} == set(patients)
        assert all(set(r) == QA_KEYS and r["dataset"] == "cq500" for r in rows)
        assert all(reports[p]["split"] == split for p in patients)
        if split != "train":
            canonical = [
                s for p in patients for s in build_cq500_samples(p, read_cq500_reads(raw / "reads.csv")[p])
            ]
            assert rows == canonical
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["qa_train.jsonl", "qa_val.jsonl", "qa_test.jsonl", "reports.jsonl", "splits.json"]
    )


def test_write_qa_reuses_and_extends_saved_splits(tmp_path):
    raw, out = cq500_raw(tmp_path, 30), tmp_path / "out"
    ids = [f"CQ500-CT-{i}" for i in range(20)]
    with pytest.warns(UserWarning):
        write_qa("cq500", raw, out, ids)
    first_train = (out / "qa_train.jsonl").read_text()
    splits = json.loads((out / "splits.json").read_text())
    moved = splits["train"].pop()
    splits["test"].append(moved)
    (out / "splits.json").write_text(json.dumps(splits))
    with pytest.warns(UserWarning):
        write_qa("cq500", raw, out, ids + ["CQ500-CT-25"])
    again = json.loads((out / "splits.json").read_text())
    assert moved in again["test"]
    assert sum("CQ500-CT-25" in again[s] for s in again) == 1
    for split in splits:
        assert set(splits[split]) <= set(again[split])
    assert {r["patient"] for r in read_jsonl(out / "qa_test.jsonl")} >= {moved}
    with pytest.warns(UserWarning):
        write_qa("cq500", raw, out, ids)
    assert json.loads((out / "splits.json").read_text()) == again
    # Training wording is seeded per patient, so moving one patient leaves the others' lines unchanged.
    expected = [row for row in map(json.loads, first_train.splitlines()) if row["patient"] != moved]
    assert read_jsonl(out / "qa_train.jsonl") == expected


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda s: s["val"].append("CQ500-CT-777"), "1 patient.* not in the label file"),
        (lambda s: s["val"].append(s["train"][0]), "more than one split"),
        (lambda s: s.pop("val"), "exactly the keys"),
    ],
)
def test_bad_saved_splits_name_the_file(tmp_path, edit, problem):
    raw, out = cq500_raw(tmp_path, 12), tmp_path / "out"
    ids = [f"CQ500-CT-{i}" for i in range(12)]
    write_qa("cq500", raw, out, ids)
    splits = json.loads((out / "splits.json").read_text())
    edit(splits)
    (out / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(InputError, match=f"splits.json: .*{problem}"):
        write_qa("cq500", raw, out, ids)


def test_write_qa_refuses_unknown_dataset_and_unlabelled_ids(tmp_path):
    raw = cq500_raw(tmp_path, 5)
    with pytest.raises(ValueError, match="'rsna' is not one of"):
        write_qa("rsna", raw, tmp_path / "out", ["a"])
    with (
        pytest.raises(InputError, match="reads.csv: none of the 1 prepared ids has labels"),
        pytest.warns(UserWarning),
    ):
        write_qa("cq500", raw, tmp_path / "out", ["CQ500-CT-77"])


@pytest.mark.skipif(not REAL.is_dir(), reason="shared label files absent")
def test_real_cq500_builds_six_questions_per_scan(tmp_path):
    (tmp_path / "raw").mkdir()
    shutil.copy(REAL / "cq500_reads.csv", tmp_path / "raw" / "reads.csv")
    ids = [f"CQ500-CT-{i}" for i in range(491)]
    summary = write_qa("cq500", tmp_path / "raw", tmp_path / "out", ids)
    assert sum(summary["samples"].values()) == 6 * 491
    assert summary["patients"]["test"] >= 0.2 * 491
    rows = read_jsonl(tmp_path / "out" / "qa_test.jsonl")
    assert all(r["answer"].split(",")[0] in ("Yes", "No") for r in rows if r["kind"] == "closed")


@pytest.mark.skipif(not REAL.is_dir(), reason="shared label files absent")
def test_real_physionet_builds_three_samples_per_patient(tmp_path):
    (tmp_path / "raw").mkdir()
    shutil.copy(
        REAL / "physionet_hemorrhage_diagnosis_raw_ct.csv",
        tmp_path / "raw" / "hemorrhage_diagnosis_raw_ct.csv",
    )
    ids = [f"{n:03d}" for n in range(49, 131) if not 59 <= n <= 65]
    summary = write_qa("physionet", tmp_path / "raw", tmp_path / "out", ids, seed=1)
    assert sum(summary["samples"].values()) == 3 * 75 and summary["patients"]["test"] >= 15
    rows = [r for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "out" / f"qa_{s}.jsonl")]
    seg = [r for r in rows if r["kind"] == "seg"]
    assert len(seg) == 75 and sum("[SEG]" in r["answer"] for r in seg) == 36
    assert sum(r["label"]["Fracture"] for r in rows if r["kind"] == "closed") == 22
    opened = [r["label"] for r in rows if r["kind"] == "open"]
    assert {k: sum(label[k] for label in opened) for k in PHYSIONET_TYPES} == {
        "IVH": 5,
        "IPH": 16,
        "SAH": 7,
        "EDH": 21,
        "SDH": 4,
    }
    assert len(read_jsonl(tmp_path / "out" / "reports.jsonl")) == 75


def test_physionet_segmentation_sample_is_optional():
    record = physionet_record({"SDH"}, fracture=0)
    without = build_physionet_samples("049", record, seg=False)
    assert [s["kind"] for s in without] == ["open", "closed"]
    assert without == build_physionet_samples("049", record)[:2]


@pytest.mark.skipif(not REAL.is_dir(), reason="shared label files absent")
def test_write_qa_without_physionet_segmentation(tmp_path):
    (tmp_path / "raw").mkdir()
    shutil.copy(
        REAL / "physionet_hemorrhage_diagnosis_raw_ct.csv",
        tmp_path / "raw" / "hemorrhage_diagnosis_raw_ct.csv",
    )
    ids = [f"{n:03d}" for n in range(49, 131) if not 59 <= n <= 65]
    summary = write_qa("physionet", tmp_path / "raw", tmp_path / "out", ids, seed=1, seg=False)
    assert sum(summary["samples"].values()) == 2 * 75
    rows = [r for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "out" / f"qa_{s}.jsonl")]
    assert sorted({r["kind"] for r in rows}) == ["closed", "open"] and not any("mask" in r for r in rows)
