"""Published figures stand only beside the data they were measured on and name their work; the README cites
the same works, says where each dataset comes from and under which terms; LICENSE matches pyproject."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from conftest import REPO

from m3d_lit.data import phrasing
from m3d_lit.data.sources import SOURCES, get_source, reference_for
from m3d_lit.data.sources.references import CHILAMKURTHY_2018, HSSAYENI_2020, M3D_2024, SEED_STUDY
from m3d_lit.evaluation.grouped_scores import compute_metrics
from m3d_lit.evaluation.markdown_report import write_report

WORKS = (M3D_2024, SEED_STUDY, CHILAMKURTHY_2018, HSSAYENI_2020)


def _closed(dataset: str, pid: str, finding: str, truth: int, p_yes: float) -> dict:
    return {"id": f"{pid}:{finding}", "patient": pid, "kind": "closed", "dataset": dataset, "finding": finding,
            "question": phrasing.closed_question(finding), "answer": phrasing.closed_answer(finding, truth),
            "prediction": "Yes." if p_yes > 0.5 else "No.", "p_yes": p_yes}  # fmt: skip


def _open(dataset: str, pid: str, answer: str, prediction: str) -> dict:
    return {"id": f"{pid}:hemorrhage", "patient": pid, "kind": "open", "dataset": dataset,
            "question": "Is there hemorrhage?", "answer": answer, "prediction": prediction}  # fmt: skip


PHYSIONET = [
    _closed("physionet", "049", "Fracture", 1, 0.8),
    _closed("physionet", "050", "Fracture", 0, 0.3),
    _open("physionet", "049", "Subdural hemorrhage on the left side.", "Subdural hemorrhage on the left side."),
    _open("physionet", "050", "No hemorrhage.", "Epidural hemorrhage on the right side."),
    {"id": "049:seg", "patient": "049", "kind": "seg", "dataset": "physionet", "prediction": "It is [SEG].",
     "answer": "It is [SEG].", "dice": 0.5, "iou": 0.3},
]  # fmt: skip
CQ500 = [
    _closed("cq500", "A", "MassEffect", 1, 0.9),
    _closed("cq500", "B", "MassEffect", 0, 0.2),
    _open("cq500", "A", "Subdural hemorrhage on the left side.", "Subdural hemorrhage on the right side."),
]
FOLDER = [
    {"id": "c1:bleed", "patient": "c1", "kind": "closed", "dataset": "folder", "question": "Is there a bleed?",
     "answer": "Yes.", "prediction": "Yes.", "p_yes": 0.9},
    {"id": "c2:bleed", "patient": "c2", "kind": "closed", "dataset": "folder", "question": "Is there a bleed?",
     "answer": "No.", "prediction": "Yes.", "p_yes": 0.6},
    {"id": "c1:open", "patient": "c1", "kind": "open", "dataset": "folder", "question": "What is found?",
     "answer": "A bleed.", "prediction": "A bleed."},
    {"id": "c1:seg", "patient": "c1", "kind": "seg", "dataset": "folder", "prediction": "It is [SEG].",
     "answer": "It is [SEG].", "dice": 0.5, "iou": 0.3},
]  # fmt: skip


def _report(tmp_path: Path, records: list[dict]) -> str:
    return write_report(
        tmp_path, compute_metrics(records, resamples=0), records, title="t", examples=0
    ).read_text()


def _table(text: str, heading: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The first table under `heading`: its column names, and each row by its first cell."""
    section = text.split(f"\n{heading}", 1)[1].split("\n#", 1)[0]
    lines = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("|")]
    return lines[0], {row[0]: dict(zip(lines[0], row)) for row in lines[2:]}


def test_physionet_report_shows_its_own_published_figures_and_no_cq500_auroc(tmp_path):
    text = _report(tmp_path, PHYSIONET)
    assert "Chilamkurthy" not in text and "Published AUROC" not in text
    assert "| PhysioNet | published | 0.3958 | 0.1064 | 0.0435 | 0.0222 | 0.2574 | 0.2141 |" in text
    assert "| 0.3000 | 0.3100 |" in text and "for PhysioNet, Hssayeni et al. 2020, the abstract" in text
    for heading, row in (
        ("## Closed findings", "PhysioNet: Fracture"),
        ("## Open question", "PhysioNet: ICH"),
    ):
        columns, rows = _table(text, heading)
        assert row in rows and not [c for c in columns if "Published" in c]


def test_one_table_of_two_datasets_gives_cq500_figures_to_cq500_rows_only(tmp_path):
    text = _report(tmp_path, CQ500 + PHYSIONET)
    published = {key: row["Published AUROC"] for key, row in _table(text, "## Open question")[1].items()}
    assert published["CQ500: ICH"] == "0.94" and published["CQ500: SDH"] == "0.95"
    assert published["PhysioNet: ICH"] == "-" and published["PhysioNet: SDH"] == "-"
    published = {key: row["Published AUROC"] for key, row in _table(text, "## Closed findings")[1].items()}
    assert published["CQ500: MassEffect"] == "0.92" and published["PhysioNet: Fracture"] == "-"
    assert "for CQ500, Chilamkurthy et al. 2018, the abstract" in text


def test_folder_report_has_no_paper_caption_and_no_published_column(tmp_path):
    text = _report(tmp_path, FOLDER)
    first = next(line for line in text.splitlines() if line.startswith("## "))
    assert first == "## Question answering: text metrics"
    for absent in ("Table 1", "| Source |", "| published |", "Published AUROC", "Published Dice", "paper"):
        assert absent not in text, absent
    assert "No published figures were measured on Folder." in text
    assert text.split("## References", 1)[1].strip() == f"- {M3D_2024.full}"  # only the m3d protocol's code


def test_records_without_a_dataset_get_no_borrowed_figures(tmp_path):
    records = [{**r, "dataset": None} for r in CQ500]
    text = _report(tmp_path, records)
    assert "0.92" not in text and "Chilamkurthy" not in text and "| published |" not in text
    assert reference_for("all", "finding") is None and reference_for("folder", "qa") is None


def test_report_cites_each_work_in_full_with_where_the_figures_stand(tmp_path):
    text = _report(tmp_path, CQ500 + PHYSIONET)
    references = text.split("## References", 1)[1]
    for work in WORKS:
        assert f"- {work.full}" in references
    for phrase in ("arXiv:2404.00578", "Lancet 2018", "Data 2020;5(1):14", "Table 1", "10.13026/4nae-zg36"):
        assert phrase in references
    assert "the brain-CT M3D-LaMed study, Table 1 (LoRA-fine-tuned M3D-LaMed answering the CQ500" in text


def test_published_figures_are_those_recorded_for_each_dataset():
    cq500, physionet = get_source("cq500"), get_source("physionet")
    assert dict(cq500.qa_reference.values) == {"bleu1": 0.5405, "bleu2": 0.3333, "bleu3": 0.2571,
                                               "bleu4": 0.2059, "rouge": 0.2975, "meteor": 0.1878}  # fmt: skip
    assert dict(physionet.qa_reference.values) == {"bleu1": 0.3958, "bleu2": 0.1064, "bleu3": 0.0435,
                                                   "bleu4": 0.0222, "rouge": 0.2574, "meteor": 0.2141}  # fmt: skip
    assert physionet.seg_reference.values == {"dice": 0.31} and physionet.finding_reference is None
    assert cq500.seg_reference is None and get_source("folder").qa_reference is None
    for source in SOURCES.values():
        for kind in ("qa", "finding", "seg"):
            ref = reference_for(source.name, kind)
            assert ref is None or (ref.work in WORKS and ref.where and ref.what)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_readme_cites_the_report_works_and_each_dataset_source_terms_and_layout():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for work in WORKS:
        assert _flat(work.full) in _flat(readme), work.short
    section = readme.split("### Public datasets", 1)[1].split("\n## ", 1)[0]
    for needed in ("headctstudy.qure.ai", "CC BY-NC-SA 4.0", "physionet.org/content/ct-ich", "Restricted Access",
                   "GoodBaiBai88/M3D-VQA", "Apache-2.0", "reads.csv", "CQ500-CT-0/", "ct_scans/", "masks/",
                   "hemorrhage_diagnosis_raw_ct.csv", "Patient_demographics.csv", "M3D_Cap.json"):  # fmt: skip
        assert needed in section, needed


@pytest.mark.parametrize("folder", ["src", "docs"])
def test_nothing_points_at_files_the_repository_does_not_hold(folder):
    files = [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".yaml"}]
    files += [REPO / "README.md"]
    assert files
    for path in files:
        assert "FORMATS.md" not in path.read_text(encoding="utf-8"), path


def test_license_is_the_apache_2_text_pyproject_declares():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.MULTILINE)
    text = (REPO / "LICENSE").read_bytes()
    # sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, unchanged
    assert (
        hashlib.sha256(text).hexdigest() == "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
    )
