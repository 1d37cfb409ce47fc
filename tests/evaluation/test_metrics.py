"""Metrics against their reference implementations (nltk, rouge-score) and hand-computed cases."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from nltk.stem.porter import PorterStemmer
from nltk.tokenize import TreebankWordTokenizer
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score.rouge_scorer import RougeScorer

from m3d_lit.evaluation import corpus_protocol
from m3d_lit.evaluation.closed import closed_metrics, parse_closed
from m3d_lit.evaluation.corpus_protocol import tokenize
from m3d_lit.evaluation.grouped_scores import compute_metrics
from m3d_lit.evaluation.segmentation import dice_iou
from m3d_lit.evaluation.wordnet import nltk_data_dirs, require_wordnet

# (prediction, reference): exact match, empty prediction, punctuation, casing, paraphrase, synonyms,
# word forms only a stemmer matches.
PAIRS = [
    ("There is a subdural hemorrhage on the left.", "There is a subdural hemorrhage on the left."),
    ("", "No, there is no fracture."),
    ("Yes", "Yes."),
    ("YES, THERE IS AN EPIDURAL BLEED!", "yes, there is an epidural bleed."),
    ("No midline shift ... mass effect isn't seen", "There's no midline shift; no mass effect."),
    ("a big haemorrhage in the brain", "a large hemorrhage in the brain"),
    ("The scan shows bleeding in the ventricles", "Intraventricular blood is seen."),
    ("It is [SEG].", "It is [SEG]."),
    ("The hemorrhages are enlarging", "An enlarged hemorrhage."),
]


def _records(pairs=PAIRS):
    return [{"prediction": p, "answer": a} for p, a in pairs]


def _reference(pairs):
    """The metrics computed the plain way: nltk and rouge-score, one call per value, no caches."""
    tok = TreebankWordTokenizer()
    hyps = [tok.tokenize(p.lower()) for p, _ in pairs]
    refs = [tok.tokenize(a.lower()) for _, a in pairs]
    smooth = SmoothingFunction().method1
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    wordnet = require_wordnet()
    out = {}
    for n in range(1, 5):
        weights = tuple([1.0 / n] * n)
        out[f"bleu{n}"] = corpus_bleu([[r] for r in refs], hyps, weights=weights)
        out[f"bleu{n}_sent"] = float(
            np.mean(
                [
                    sentence_bleu([r], h, weights=weights, smoothing_function=smooth)
                    for h, r in zip(hyps, refs)
                ]
            )
        )
    rouge = [scorer.score(a, p) for p, a in pairs]
    for key in ("rouge1", "rouge2", "rougeL"):
        out[key] = float(np.mean([s[key].fmeasure for s in rouge]))
    out["meteor"] = float(
        np.mean([meteor_score([r], h, stemmer=PorterStemmer(), wordnet=wordnet) for h, r in zip(hyps, refs)])
    )
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_text_metrics_equal_reference_implementations():
    got = compute_metrics(_records(), "corpus")
    want = _reference(PAIRS)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["n"] == len(PAIRS)
    # The pairs exercise both ends of each scale, so equality above is not trivially 0 == 0.
    assert 0.0 < got["bleu4_sent"] < 1.0 and 0.0 < got["meteor"] < 1.0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("pair", PAIRS, ids=range(len(PAIRS)))
def test_each_pair_alone_equals_reference(pair):
    got = compute_metrics(_records([pair]), "corpus")
    for key, value in _reference([pair]).items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_exact_match_scores_one_and_empty_prediction_zero():
    same = compute_metrics(_records([PAIRS[0]]), "corpus")
    for key in ("bleu1", "bleu4", "bleu4_sent", "rouge1", "rouge2", "rougeL"):
        assert same[key] == pytest.approx(1.0)
    assert same["meteor"] > 0.99  # METEOR's fragmentation penalty keeps it just below 1
    empty = compute_metrics(_records([PAIRS[1]]), "corpus")
    for key in ("bleu1", "bleu1_sent", "rouge1", "meteor"):
        assert empty[key] == 0.0


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("There's NO bleed, (left).") == ["there", "'s", "no", "bleed", ",", "(", "left", ")", "."]
    assert tokenize("") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", 1),
        ("yes.", 1),
        ("  YES, there is", 1),
        ("**No**", 0),
        ('"no" - none seen', 0),
        ("No.", 0),
        ("\nnO\t", 0),
        ("Nope", None),
        ("yesterday", None),
        ("There is no bleed", None),
        ("", None),
    ],
)
def test_parse_closed(text, expected):
    assert parse_closed(text) == expected


def test_closed_metrics_hand_case():
    # truth Yes,No,No,No; predictions Yes,Yes,No,(unparsed -> wrong, here a false Yes)
    got = closed_metrics([1, 0, 0, 0], [1, 1, 0, None])
    assert got["accuracy"] == pytest.approx(0.5)
    assert got["balanced_accuracy"] == pytest.approx((1.0 + 1.0 / 3.0) / 2.0)
    assert got["f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 0))
    assert got["unparsed"] == 1 and got["positives"] == 1 and got["n"] == 4
    assert got["majority_baseline"] == {"answer": "No", "accuracy": 0.75, "balanced_accuracy": 0.5}


def test_closed_metrics_majority_yes_and_single_class():
    got = closed_metrics([1, 1, 0], [0, 1, 0])
    assert got["majority_baseline"]["answer"] == "Yes"
    assert got["majority_baseline"]["accuracy"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    # Only one class present: balanced accuracy is that class's recall; no positives -> F1 0, not NaN.
    only_no = closed_metrics([0, 0], [0, 1])
    assert only_no["balanced_accuracy"] == pytest.approx(0.5)
    assert only_no["f1"] == 0.0
    assert closed_metrics([0, 0], [0, 0])["f1"] == 0.0
    with pytest.raises(ValueError, match="equal, non-zero"):
        closed_metrics([1], [1, 0])


def test_dice_iou_hand_cases():
    pred = np.array([[1, 1, 0, 0]], dtype=bool)
    target = np.array([[1, 0, 1, 0]], dtype=np.uint8)
    assert dice_iou(pred, target) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(np.zeros((2, 2), bool), np.zeros((2, 2))) == (1.0, 1.0)
    assert dice_iou(np.zeros((2, 2), bool), np.ones((2, 2))) == (0.0, 0.0)
    # Float input = logits: sigmoid(x) > 0.5 <=> x > 0; a float {0, 1} mask therefore also works.
    logits = torch.tensor([[3.0, -2.0, 0.1, -0.1]], dtype=torch.bfloat16)
    assert dice_iou(logits, torch.tensor([[1.0, 0.0, 1.0, 0.0]])) == (1.0, 1.0)
    assert dice_iou(torch.tensor([[0.0, 1.0]]), np.array([[0, 1]])) == (1.0, 1.0)
    # A higher threshold drops the 0.1 logit (sigmoid 0.52).
    assert dice_iou(logits, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), threshold=0.6) == (1.0, 1.0)


def test_dice_iou_checks_arguments():
    with pytest.raises(ValueError, match=r"\(2, 2\) differs from target shape \(4,\)"):
        dice_iou(np.zeros((2, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="threshold"):
        dice_iou(np.zeros(2), np.zeros(2), threshold=1.0)


def test_groups_closed_and_segmentation_keys():
    records = [
        {"prediction": "Yes.", "answer": "Yes", "kind": "closed", "question": "Is there SDH?", "dataset": "cq500"},
        {"prediction": "No", "answer": "Yes.", "kind": "closed", "question": "Is there  SDH?", "dataset": "cq500"},
        {"prediction": "maybe", "answer": "No.", "kind": "closed", "question": "Is there EDH?", "dataset": "cq500"},
        {"prediction": "No bleed.", "answer": "No bleed is seen.", "kind": "open", "dataset": "physionet"},
        {"prediction": "It is [SEG].", "answer": "It is [SEG].", "kind": "seg", "dataset": "physionet", "dice": 0.5, "iou": 0.25},
        {"prediction": "It is [SEG].", "answer": "It is [SEG].", "kind": "seg", "dataset": "physionet", "dice": 0.7, "iou": 0.45},
    ]  # fmt: skip
    got = compute_metrics(records, "corpus")
    json.dumps(got, allow_nan=False)  # never NaN
    assert set(got["by_dataset"]) == {"cq500", "physionet"}
    assert set(got["by_kind"]) == {"closed", "open", "seg"}
    assert got["n_closed"] == 3 and got["closed_unparsed"] == 1 and got["closed_positives"] == 2
    assert got["accuracy"] == pytest.approx(1 / 3)
    # Whitespace in the question does not split its row.
    assert set(got["closed"]) == {"Is there SDH?", "Is there EDH?", "pooled"}
    assert got["closed"]["Is there SDH?"]["accuracy"] == pytest.approx(0.5)
    assert got["closed"]["pooled"]["accuracy"] == pytest.approx(1 / 3)
    assert got["dice"] == pytest.approx(0.6) and got["iou"] == pytest.approx(0.35)
    assert "dice" not in got["by_dataset"]["cq500"] and "accuracy" not in got["by_dataset"]["physionet"]
    assert got["by_kind"]["seg"]["n"] == 2 and got["by_kind"]["seg"]["bleu1"] == pytest.approx(1.0)
    # Segmentation samples have their own table: the text metrics of all records leave them out.
    assert got["n_text"] == 4 and got["text_kinds"] == ["closed", "open"]
    assert got["by_dataset"]["physionet"]["n_text"] == 1 and got["by_dataset"]["physionet"]["n"] == 3
    # An open answer starting with "No" is not a closed question.
    assert "accuracy" not in got["by_kind"]["open"]


def test_compute_metrics_checks_records():
    with pytest.raises(ValueError, match="at least one record"):
        compute_metrics([])
    with pytest.raises(ValueError, match="record 0 needs a string 'prediction'"):
        compute_metrics([{"prediction": None, "answer": "x"}])
    with pytest.raises(ValueError, match="only one of 'dice' and 'iou'"):
        compute_metrics([{"prediction": "x", "answer": "x", "dice": 1.0}])
    # the same schema check as `score` reading a predictions file (evaluation/predictions.py)
    with pytest.raises(ValueError, match="record 0 'iou' must be a finite number, got nan"):
        compute_metrics([{"prediction": "x", "answer": "x", "dice": 1.0, "iou": float("nan")}])


def test_default_nltk_data_is_the_venv(monkeypatch):
    monkeypatch.delenv("NLTK_DATA", raising=False)
    assert nltk_data_dirs() == [Path(sys.prefix) / "nltk_data"]
    assert require_wordnet().get_version() == "3.0"


def test_missing_wordnet_says_how_to_fix_it(tmp_path):
    code = (
        "from m3d_lit.evaluation.wordnet import WordNetMissingError\n"
        "from m3d_lit.evaluation.grouped_scores import compute_metrics\n"
        "try:\n    compute_metrics([{'prediction': 'a', 'answer': 'a'}])\n"
        "except WordNetMissingError as err:\n    print(err)\nelse:\n    print('NO ERROR')\n"
    )
    env = {**os.environ, "NLTK_DATA": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    message = out.stdout
    assert str(tmp_path) in message and "WordNet 3.0 is missing" in message
    assert "make setup" in message and "NLTK_DATA" in message


@pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed"
)
def test_setup_wordnet_script_makes_nltk_load_it(tmp_path, monkeypatch):
    target = tmp_path / "nltk_data"
    run = subprocess.run(
        ["bash", str(REPO / "scripts/setup_wordnet.sh"), str(target)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    monkeypatch.setenv("NLTK_DATA", str(target))
    reader = require_wordnet()
    assert Path(str(reader.root)) == target / "corpora" / "wordnet"
    assert reader.get_version() == "3.0"
    assert "large" in {lemma.name() for s in reader.synsets("big") for lemma in s.lemmas()}
    man = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if man.is_file():  # the hard-coded lexnames must equal WordNet's own list
        listed = [
            line.split("\t")[:2] for line in gzip.open(man, "rt") if line[:2].isdigit() and "\t" in line
        ]
        written = [
            line.split("\t")[:2] for line in (target / "corpora/wordnet/lexnames").read_text().splitlines()
        ]
        assert [[i, n.strip()] for i, n in listed] == written


def test_metric_caches_do_not_change_meteor():
    # The memoised stemmer and WordNet wrapper give the same value as fresh ones, on repeated calls.
    ref, hyp = tokenize("a large bleed in the brain"), tokenize("a big haemorrhage in the brain")
    fresh = meteor_score([ref], hyp, stemmer=PorterStemmer(), wordnet=require_wordnet())
    cached = corpus_protocol.sample_scores(["a big haemorrhage in the brain"] * 2, ["a large bleed in the brain"] * 2)
    assert cached["meteor"] == pytest.approx([fresh, fresh], abs=1e-12)
    assert math.isfinite(fresh) and fresh > 0.5
