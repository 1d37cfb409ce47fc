"""Closed-question AUROC and rates, the open-question parser, and the patient-level bootstrap, against
independent computations."""

from __future__ import annotations

import itertools
import json
import random
from fractions import Fraction

import numpy as np
import pytest
from nltk.translate.bleu_score import corpus_bleu

from m3d_lit.commands.score import main as score_main
from m3d_lit.data import phrasing
from m3d_lit.errors import InputError
from m3d_lit.evaluation.bootstrap import auroc_rows, interval, patient_of, patient_weights, weighted_auroc
from m3d_lit.evaluation.closed import closed_scores, rate_intervals, rates
from m3d_lit.evaluation.corpus_protocol import bleu_counts as _bleu_counts
from m3d_lit.evaluation.corpus_protocol import corpus_bleu_from_counts, tokenize
from m3d_lit.evaluation.findings_report import roc_points
from m3d_lit.evaluation.grouped_scores import compute_metrics
from m3d_lit.evaluation.open_findings import OpenFindings, open_scores, parse_open
from m3d_lit.evaluation.tables import format_open


def _mann_whitney(scores, labels, weights):
    """AUROC as the weighted share of (positive, negative) pairs ordered right, ties half: exact."""
    num, den = Fraction(0), Fraction(0)
    for (s_i, y_i, w_i), (s_j, y_j, w_j) in itertools.product(zip(scores, labels, weights), repeat=2):
        if y_i and not y_j:
            pair = Fraction(w_i) * Fraction(w_j)
            den += pair
            num += pair if s_i > s_j else pair / 2 if s_i == s_j else 0
    return float(num / den)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 30))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 6, n) / 5.0  # few distinct values: many ties
    weights = rng.integers(0, 4, n).astype(float)
    weights[:2] = 1.0
    got = weighted_auroc(scores, labels, weights)
    # float64 sums of at most 30 small-integer products are exact; only the final division rounds
    assert got == pytest.approx(_mann_whitney(scores.tolist(), labels.tolist(), weights.tolist()), abs=1e-12)
    rows = rng.integers(0, 3, (4, n)).astype(float)
    rows[:, :2] = 1.0
    for row, value in zip(rows, auroc_rows(scores, labels, rows)):
        assert value == pytest.approx(
            _mann_whitney(scores.tolist(), labels.tolist(), row.tolist()), abs=1e-12
        )
    # integer weights are duplicated records
    repeated = np.repeat(np.arange(n), weights.astype(int))
    assert weighted_auroc(scores[repeated], labels[repeated]) == pytest.approx(got, abs=1e-12)


def test_auroc_hand_cases_and_single_class():
    assert weighted_auroc(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0
    assert weighted_auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    assert weighted_auroc(np.array([0.1, 0.9]), np.array([1, 0])) == 0.0
    assert np.isnan(weighted_auroc(np.array([0.1, 0.9]), np.array([1, 1])))
    fpr, tpr = roc_points(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 1, 0, 0]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]


def _closed(pid, finding, truth, pred, p_yes=None):
    record = {
        "id": f"{pid}:{finding}",
        "kind": "closed",
        "finding": finding,
        "dataset": "cq500",
        "question": f"Is there {finding}?",
        "answer": "Yes, there is." if truth else "No, there is none.",
        "prediction": pred,
    }
    if p_yes is not None:
        record["p_yes"] = p_yes
    return record


RECORDS = [
    _closed("A", "Fracture", 1, "Yes.", 0.9),
    _closed("B", "Fracture", 1, "No.", 0.4),
    _closed("C", "Fracture", 0, "No.", 0.2),
    _closed("D", "Fracture", 0, "Yes.", 0.6),
    _closed("E", "Fracture", 0, "maybe", 0.1),
    _closed("A", "MassEffect", 0, "No.", 0.3),
    _closed("B", "MassEffect", 0, "No.", 0.2),
    _closed("C", "MidlineShift", 1, "Yes.", None),
    _closed("D", "MidlineShift", 0, "No.", None),
]


def test_closed_scores_per_finding_and_pooled():
    got = closed_scores(RECORDS)
    fracture = got["Fracture"]
    # truth Y Y N N N; answers Y N N Y (unparsed -> wrong, so Y): tp 1, fn 1, tn 1, fp 2
    assert fracture["sensitivity"] == 0.5 and fracture["specificity"] == pytest.approx(1 / 3)
    assert fracture["balanced_accuracy"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert fracture["majority_baseline"] == {"answer": "No", "accuracy": 0.6, "balanced_accuracy": 0.5}
    # p_yes ranks: positives 0.9, 0.4 against negatives 0.6, 0.2, 0.1: 5 of 6 pairs right
    assert fracture["auroc"] == pytest.approx(5 / 6) and fracture["n_p_yes"] == 5
    mass = got["MassEffect"]
    assert mass["auroc"] is None and mass["auroc_note"] == "undefined: every reference is No (2 records)"
    assert mass["sensitivity"] is None and mass["specificity"] == 1.0 and mass["balanced_accuracy"] == 1.0
    shift = got["MidlineShift"]
    assert shift["auroc"] is None and shift["auroc_note"] == "no p_yes in the records"
    assert shift["balanced_accuracy"] == 1.0  # every score but AUROC
    pooled = got["pooled"]
    assert pooled["n"] == 9 and pooled["n_p_yes"] == 7
    assert pooled["auroc"] == pytest.approx(
        _mann_whitney([0.9, 0.4, 0.2, 0.6, 0.1, 0.3, 0.2], [1, 1, 0, 0, 0, 0, 0], [1] * 7)
    )
    json.dumps(got, allow_nan=False)


def test_rate_intervals_equal_rates_per_resample():
    truth = np.array([1, 1, 0, 0, 0, 1, 0], dtype=bool)
    pred = np.array([1, 0, 0, 1, 0, 1, 1], dtype=bool)
    weights = patient_weights(list("ABCDEFG"), 300, seed=3)
    got = rate_intervals(truth, pred, weights, ("sensitivity", "specificity", "balanced_accuracy", "f1"))
    for key, bounds in got.items():
        values = [rates(truth, pred, w)[key] for w in weights]
        assert bounds == interval(np.array([np.nan if v is None else v for v in values])), key


def test_patient_weights_keep_a_patients_records_together():
    records = [{"id": "P1:a"}, {"id": "P1:b"}, {"patient": "P2", "id": "x"}, {"id": "P3:a"}, {}]
    patients = [patient_of(r, i) for i, r in enumerate(records)]
    assert patients == ["P1", "P1", "P2", "P3", "<record 4>"]
    weights = patient_weights(patients, 500, seed=0)
    assert weights.shape == (500, 5)
    assert (weights[:, 0] == weights[:, 1]).all()
    # each resample draws as many patients as there are (4), each counted once per record it holds
    assert (weights[:, [0, 2, 3, 4]].sum(1) == 4).all()
    assert (patient_weights(patients, 500, seed=0) == weights).all()
    assert not (patient_weights(patients, 500, seed=1) == weights).all()
    assert interval(np.array([np.nan, np.nan, 1.0])) is None


def test_corpus_bleu_from_counts_equals_nltk_on_resampled_corpora():
    pairs = [
        ("There is a subdural hemorrhage.", "There is a subdural hemorrhage on the left side."),
        ("No.", "No, there is no fracture."),
        ("Yes, there is a fracture.", "Yes, there is a fracture."),
        ("", "No intracranial hemorrhage."),
        ("Epidural hemorrhage on the right side.", "Subdural hemorrhage on the right side."),
    ]
    counts = _bleu_counts([p for p, _ in pairs], [a for _, a in pairs])
    rng = random.Random(0)
    for _ in range(20):
        draw = [rng.randrange(len(pairs)) for _ in pairs]
        weights = np.bincount(draw, minlength=len(pairs)).astype(float)
        weights_fn = [tuple([1.0 / n] * n) for n in range(1, 5)]
        want = corpus_bleu(
            [[tokenize(pairs[i][1])] for i in draw], [tokenize(pairs[i][0]) for i in draw], weights=weights_fn
        )
        # the same integer counts; nltk sums w*log(p) with fsum, we divide a cumulative sum: 1e-12
        assert corpus_bleu_from_counts(weights @ counts) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("index", range(3))
def test_parse_open_reads_back_every_phrased_answer(index):
    class Pick:
        def choice(self, options):
            return options[index]

    keys = list(phrasing.TYPE_NAMES) + ["ICH", "BleedLocation-Left", "BleedLocation-Right"]
    for values in itertools.product([0, 1], repeat=len(keys)):
        findings = dict(zip(keys, values))
        types = frozenset(k for k in phrasing.TYPE_NAMES if findings[k])
        bleed = bool(findings["ICH"] or types)
        left, right = findings["BleedLocation-Left"], findings["BleedLocation-Right"]
        side = (
            ("both" if left and right else "left" if left else "right" if right else None) if bleed else None
        )
        answer = phrasing.open_answer(findings, Pick())
        assert parse_open(answer) == OpenFindings(bleed, types, side), answer


def test_parse_open_on_free_predictions():
    assert parse_open("No hemorrhage is seen.") == OpenFindings(False, frozenset(), None)
    assert parse_open("There is no intracranial bleeding") == OpenFindings(False, frozenset(), None)
    assert parse_open("Subdural and subarachnoid bleed, left.") == OpenFindings(
        True, frozenset({"SDH", "SAH"}), "left"
    )
    assert parse_open("A bilateral hemorrhage.") == OpenFindings(True, frozenset(), "both")
    assert parse_open("") == OpenFindings(False, frozenset(), None)


def test_open_scores_hand_case():
    records = [
        {"id": "A:h", "kind": "open", "question": phrasing.open_question(True), "answer": "Subdural hemorrhage on the left side.", "prediction": "Subdural hemorrhage on the left side."},
        {"id": "B:h", "kind": "open", "dataset": "cq500", "answer": "Epidural hemorrhage on the right side.", "prediction": "Subdural hemorrhage on the left side."},
        {"id": "C:h", "kind": "open", "dataset": "cq500", "answer": "No intracranial hemorrhage.", "prediction": "Subarachnoid hemorrhage."},
        {"id": "D:h", "kind": "open", "dataset": "cq500", "answer": "No intracranial hemorrhage.", "prediction": "No intracranial hemorrhage."},
        {"id": "E:s", "kind": "seg", "answer": "It is [SEG].", "prediction": "It is [SEG]."},
    ]  # fmt: skip
    got = open_scores(records, patient_weights(["A", "B", "C", "D", "E"], 200, seed=0))
    table = format_open({"open_findings": got}).splitlines()
    assert table[4].split() == ["SDH", "4", "1", "0.667", "1.000", "0.667"]
    assert table[-1].split() == ["side", "accuracy", "2", "-", "0.500"]
    assert got["n"] == 4
    other = {
        "kind": "open",
        "dataset": "m3d_vqa",
        "question": "Which abnormality?",
        "answer": "A hemorrhage.",
        "prediction": "x",
    }
    assert open_scores([other]) is None  # another dataset's open answer is not this question
    sdh = got["types"]["SDH"]  # truth A; predicted A, B: tp 1, fp 1, tn 2
    assert (sdh["sensitivity"], sdh["specificity"], sdh["f1"]) == (1.0, 2 / 3, pytest.approx(2 / 3))
    edh = got["types"]["EDH"]
    assert edh["sensitivity"] == 0.0 and edh["f1"] == 0.0
    ich = got["types"]["ICH"]  # truth A, B; predicted A, B, C
    assert (ich["sensitivity"], ich["specificity"]) == (1.0, 0.5)
    assert got["side"] == {"n": 2, "accuracy": 0.5, "ci95": got["side"]["ci95"]}
    assert got["types"]["IVH"]["sensitivity"] is None and got["types"]["IVH"]["ci95"]["sensitivity"] is None
    json.dumps(got, allow_nan=False)


@pytest.mark.parametrize(
    ("value", "shown"), [(1.5, "1.5"), ('"0.3"', "'0.3'"), ("NaN", "nan"), ("true", "True"), (-0.1, "-0.1")]
)
def test_bad_p_yes_is_an_input_error(tmp_path, value, shown):
    path = tmp_path / "p.jsonl"
    good = json.dumps(RECORDS[0])
    bad = json.dumps(RECORDS[1])[:-1].replace('"p_yes": 0.4', f'"p_yes": {value}') + "}"
    path.write_text(good + "\n" + bad + "\n")
    with pytest.raises(InputError, match=rf"line 2: 'p_yes' must be a number in \[0, 1\], got {shown}"):
        score_main([str(path)])


def test_single_class_finding_says_undefined_never_nan(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "m.json"
    assert score_main([str(path), "--out", str(out), "--bootstrap", "100"]) == 0
    printed = capsys.readouterr().out
    assert "MassEffect: AUROC undefined: every reference is No (2 records)" in printed
    assert "nan" not in printed.lower()
    written = json.loads(out.read_text())
    assert written["closed"]["MassEffect"]["auroc"] is None
    assert written["closed"]["pooled"]["ci95"]["auroc"] is not None
    assert written == compute_metrics(RECORDS, resamples=100)  # the seeded bootstrap repeats exactly
