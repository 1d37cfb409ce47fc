"""report.md: text metrics beside the published ones, closed table with baselines, Dice, plot, examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from m3d_lit.data import phrasing
from m3d_lit.data.sources import get_source
from m3d_lit.evaluation.grouped_scores import compute_metrics
from m3d_lit.evaluation.markdown_report import write_report

RECORDS = [
    {"id": "CQ500-CT-1/q0", "prediction": "Yes.", "answer": "Yes", "kind": "closed", "question": "Is there a bleed?", "dataset": "cq500"},
    {"id": "CQ500-CT-2/q0", "prediction": "No", "answer": "No.", "kind": "closed", "question": "Is there a bleed?", "dataset": "cq500"},
    {"id": "CQ500-CT-3/q0", "prediction": "No", "answer": "Yes.", "kind": "closed", "question": "Is there a fracture?", "dataset": "cq500"},
    {"id": "CQ500-CT-1/q1", "prediction": "A left | subdural\nbleed.", "answer": "Left subdural hemorrhage.", "kind": "open", "dataset": "cq500"},
    {"id": "049/seg", "prediction": "It is [SEG].", "answer": "It is [SEG].", "kind": "seg", "dataset": "physionet", "dice": 0.4, "iou": 0.25},
]  # fmt: skip


def _volume(record):
    """Depth 5: only the middle slice (index 2) is bright, so the picture shows which slice was taken."""
    volume = np.zeros((1, 5, 8, 6), dtype=np.float32)
    volume[0, 2] = 1.0
    return torch.from_numpy(volume) if record["dataset"] == "cq500" else volume


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    metrics = compute_metrics(RECORDS)
    path = write_report(out, metrics, RECORDS, title="tiny eval", images=_volume, examples=3)
    return out, path, path.read_text(encoding="utf-8"), metrics


def test_table1_rows_beside_paper_values(report):
    _, path, text, metrics = report
    assert path.name == "report.md" and text.startswith("# tiny eval\n")
    paper = get_source("cq500").qa_reference.values
    assert f"| CQ500 | published | {paper['bleu1']:.4f} | {paper['bleu2']:.4f}" in text
    ours = metrics["by_dataset"]["cq500"]
    low, high = ours["ci95"]["bleu1"]
    assert f"| CQ500 | ours | {ours['bleu1']:.4f} [{low:.3f}, {high:.3f}] |" in text
    assert "| BLEU-1 (m3d) |" in text and "| ROUGE-1 (m3d) |" in text and "| meteor (m3d) |" in text
    assert f"| {ours['meteor']:.4f} [" in text and "| 4 | closed, open |" in text
    # PhysioNet's only record here is a segmentation sample: no Table 1 row of ours, only the published one.
    assert "| PhysioNet | published | 0.3958 |" in text and "| PhysioNet | ours |" not in text


def test_closed_table_has_baselines_and_plot(report):
    out, _, text, metrics = report
    bleed = metrics["by_dataset"]["cq500"]["closed"]["Is there a bleed?"]
    assert bleed["balanced_accuracy"] == 1.0
    assert "| CQ500: Is there a bleed? | 2 | 1 | 1.0000 | 0.5000 | 1.0000 | 0.5000 | 1.0000 | No |" in text
    assert "| **CQ500: all closed** | 3 | 2 | 0.6667 | 0.6667 |" in text
    assert "(closed_balanced_accuracy.png)" in text
    plot = imread(out / "closed_balanced_accuracy.png")
    assert plot.ndim == 3 and plot.shape[0] > 50


def test_segmentation_and_definitions(report):
    _, _, text, _ = report
    assert (
        "| PhysioNet | 1 | seg (reference mask non-empty) | 0.4000 [0.400, 0.400] | 0.2500 [0.250, 0.250] |"
        in text
    )
    for phrase in ("13a", "max_order=n", "without stemming", "single_meteor_score", "WordNet 3.0", "Punkt"):
        assert phrase in text


def test_corpus_protocol_report_names_it(tmp_path):
    metrics = compute_metrics(RECORDS, "corpus", resamples=0)
    text = write_report(tmp_path, metrics, RECORDS, title="t", examples=0).read_text()
    ours = metrics["by_dataset"]["cq500"]
    assert f"| CQ500 | ours | {ours['bleu1']:.4f} | " in text  # no bootstrap, no brackets
    assert f"| CQ500 | ours, sentence BLEU | {ours['bleu1_sent']:.4f} |" in text
    assert "| BLEU-1 (corpus) |" in text and "not a like-for-like comparison" in text
    for phrase in ("TreebankWordTokenizer", "corpus_bleu", "method1", "use_stemmer=True", "PorterStemmer"):
        assert phrase in text


def test_examples_show_middle_slice_and_texts(report):
    out, _, text, _ = report
    pictures = sorted((out / "examples").iterdir())
    assert len(pictures) == 3
    for picture in pictures:
        pixels = imread(picture)
        assert pixels.shape[:2] == (8, 6)
        assert pixels[..., :3].min() == pytest.approx(1.0)  # the bright middle slice, not a dark one
    # Round-robin over (dataset, kind): the seg example shows although it is the last record.
    assert "### 049_seg (physionet, seg)" in text and "### CQ500-CT-1_q0 (cq500, closed)" in text
    assert "- Prediction: It is [SEG]." in text
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_open_answer_text_stays_on_one_table_safe_line(tmp_path):
    records = [dict(RECORDS[3])]
    path = write_report(tmp_path, compute_metrics(records), records, title="t", images=None)
    text = path.read_text()
    assert "- Prediction: A left \\| subdural bleed." in text
    assert not (tmp_path / "examples").exists()
    assert "Closed Yes/No" not in text and "## Segmentation" not in text


def test_records_without_dataset_get_an_all_row(tmp_path):
    records = [{"prediction": "yes", "answer": "Yes"}, {"prediction": "no", "answer": "Yes"}]
    text = write_report(tmp_path, compute_metrics(records), records, title="t", examples=0).read_text()
    assert "| all | 0.0000 [" in text and "| published |" not in text and "| Source |" not in text
    assert "No published figures belong to these records: they name no dataset." in text
    assert (
        "| all: (no question) | 2 | 2 |" in text
        and "| **all: all closed** | 2 | 2 | 0.5000 | 1.0000 |" in text
    )
    assert "## Examples" not in text
    with pytest.raises(ValueError, match="examples must be >= 0"):
        write_report(tmp_path, compute_metrics(records), records, title="t", examples=-1)


def test_closed_findings_beside_chilamkurthy_with_roc_and_open_findings(tmp_path):
    def closed(pid, finding, truth, p_yes):
        answer = phrasing.closed_answer(finding, truth)
        prediction = "Yes." if p_yes > 0.5 else "No."
        return {"id": f"{pid}:{finding}", "kind": "closed", "dataset": "cq500", "finding": finding,
                "question": phrasing.closed_question(finding), "answer": answer, "prediction": prediction, "p_yes": p_yes}  # fmt: skip

    records = [
        closed("A", "MassEffect", 1, 0.9), closed("B", "MassEffect", 0, 0.2), closed("C", "MassEffect", 1, 0.4),
        closed("A", "ChronicBleed", 0, 0.3), closed("B", "ChronicBleed", 0, 0.1),
        {"id": "A:hemorrhage", "kind": "open", "dataset": "cq500", "question": "Is there hemorrhage?",
         "answer": "Subdural hemorrhage on the left side.", "prediction": "Subdural hemorrhage on the right side."},
    ]  # fmt: skip
    metrics = compute_metrics(records, resamples=200)
    text = write_report(tmp_path, metrics, records, title="t", examples=0).read_text()
    mass = metrics["by_dataset"]["cq500"]["closed"]["MassEffect"]
    low, high = mass["ci95"]["auroc"]
    assert f"| CQ500: MassEffect | 3 | 2 | {mass['auroc']:.3f} [{low:.3f}, {high:.3f}] | 0.92 |" in text
    assert "| CQ500: ChronicBleed | 2 | 0 | (undefined: every reference is No (2 records)) | - |" in text
    assert "**CQ500: pooled**" in text and "Chilamkurthy S, Ghosh R" in text and "Lancet 2018" in text
    assert "(closed_roc.png)" in text
    roc = imread(tmp_path / "closed_roc.png")
    assert roc.ndim == 3 and roc.shape[0] > 100
    assert (
        "| CQ500: SDH | 1 | 1 | 1.000" in text
        and "| CQ500: side (where the reference names one) | 1 |" in text
    )
    assert "nan" not in text.lower()
