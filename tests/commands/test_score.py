"""`m3d-lit score` on fixture files written here."""

from __future__ import annotations

import json

import pytest

from m3d_lit.commands.score import main
from m3d_lit.errors import InputError
from m3d_lit.evaluation.grouped_scores import compute_metrics
from m3d_lit.evaluation.predictions import read_predictions
from m3d_lit.evaluation.tables import format_table

RECORDS = [
    {"prediction": "Yes.", "answer": "Yes", "kind": "closed", "question": "Is there a bleed?", "dataset": "cq500"},
    {"prediction": "no", "answer": "Yes.", "kind": "closed", "question": "Is there a bleed?", "dataset": "cq500"},
    {"prediction": "A left subdural bleed.", "answer": "Left subdural hemorrhage.", "kind": "open", "dataset": "physionet"},
    {"prediction": "It is [SEG].", "answer": "It is [SEG].", "kind": "seg", "dataset": "physionet", "dice": 0.4, "iou": 0.25},
]  # fmt: skip


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_score_writes_metrics_and_prints_table(tmp_path, capsys):
    preds = _write(
        tmp_path / "predictions.jsonl",
        [json.dumps(r) for r in RECORDS[:2]] + [""] + [json.dumps(r) for r in RECORDS[2:]],
    )
    out = tmp_path / "sub" / "metrics.json"
    assert main([str(preds), "--out", str(out), "--protocol", "corpus"]) == 0
    written = json.loads(out.read_text())
    expected = compute_metrics(RECORDS, "corpus")
    assert written.keys() == expected.keys() and written["protocol"] == "corpus"
    for key in ("bleu1", "bleu4", "bleu2_sent", "rougeL", "meteor", "accuracy", "dice"):
        assert written[key] == pytest.approx(expected[key], abs=1e-12)
    assert written["ci95"] == expected["ci95"]  # the seeded bootstrap repeats exactly
    assert written["by_dataset"]["physionet"]["dice"] == pytest.approx(0.4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json"]  # no temp file left
    printed = capsys.readouterr().out
    assert "4 samples" in printed and "physionet" in printed and "kind:seg" in printed
    assert "Is there a bleed?" in printed  # the closed-question table
    assert f"{expected['meteor']:.4f}" in printed and "meteor [corpus]" in printed
    assert "AUROC no p_yes in the records" in printed


def test_score_without_out_only_prints(tmp_path, capsys):
    preds = _write(tmp_path / "p.jsonl", [json.dumps({"prediction": "a b c", "answer": "a b c"})])
    assert main([str(preds)]) == 0
    assert "1.0000" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (['{"prediction": "a", "answer": "a"}', '{"prediction": "a", "answer": '], "line 2 is not JSON"),
        (['["a", "b"]'], "line 1 is not a JSON object but a list"),
        (['{"answer": "a"}'], "line 1: needs a string 'prediction'"),
        (['{"prediction": "a", "answer": 3}'], "line 1: needs a string 'answer'"),
        (["", '{"prediction": "a", "answer": "a", "dice": 0.5}'], "line 2: has only one of 'dice' and 'iou'"),
        (
            ['{"prediction": "a", "answer": "a", "dice": "x", "iou": 1}'],
            "line 1: 'dice' must be a finite number",
        ),
        (
            ['{"prediction": "a", "answer": "a", "dice": NaN, "iou": 1}'],
            "line 1: 'dice' must be a finite number",
        ),
        (["", "  "], "holds no predictions"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, problem):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(InputError, match=problem) as err:
        main([str(path)])
    assert err.value.path == str(path)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_predictions(tmp_path / "absent.jsonl")


def test_format_table_leaves_missing_metrics_blank():
    table = format_table({"n": 2, "bleu1": 0.5, "by_dataset": {"x": {"n": 2, "bleu1": 0.25, "dice": 0.125}}})
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines()}
    assert lines["bleu1"] == ["0.5000", "0.2500"]
    assert lines["dice"] == ["-", "0.1250"]
    assert "meteor" not in lines
