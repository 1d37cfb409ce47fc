"""The `m3d` protocol against independent computations: sacrebleu's own BLEU, a hand-written ROUGE, nltk's
METEOR on hand-tokenised texts; and the `--protocol` option."""

from __future__ import annotations

import itertools
import json
import math
import re
from fractions import Fraction

import pytest
from nltk.tokenize import NLTKWordTokenizer
from nltk.translate.meteor_score import single_meteor_score
from sacrebleu.metrics import BLEU

from m3d_lit.commands.score import main as score_main
from m3d_lit.data import phrasing
from m3d_lit.errors import InputError
from m3d_lit.evaluation.grouped_scores import compute_metrics
from m3d_lit.evaluation.m3d_protocol import bleu, bleu_tokens, m3d_sample_scores, word_tokens
from m3d_lit.evaluation.wordnet import require_wordnet

# (prediction, reference): exact, empty prediction, one word, case, punctuation, longer and shorter than
# the reference, numbers, a paraphrase, two sentences.
PAIRS = [
    ("There is a subdural hemorrhage on the left side.", "There is a subdural hemorrhage on the left side."),
    ("", "No, there is no fracture."),
    ("Yes", "Yes."),
    ("yes", "Yes"),
    ("YES, THERE IS AN EPIDURAL BLEED!", "Yes, there is an epidural bleed."),
    ("No midline shift ... mass effect isn't seen", "There's no midline shift; no mass effect."),
    ("Subdural hemorrhage on the left side and a small subdural hemorrhage on the right", "Subdural hemorrhage."),
    ("Hemorrhage.", "Intraparenchymal and subdural hemorrhage on the left side."),
    ("A 3.5 cm bleed, (left).", "A 3.5 cm bleed (left)."),
    ("The scan shows bleeding in the ventricles", "Intraventricular blood is seen."),
    ("  No. There is no bleed.  ", "No intracranial hemorrhage."),
]  # fmt: skip


@pytest.mark.parametrize("pair", PAIRS, ids=range(len(PAIRS)))
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bleu_equals_sacrebleu_without_smoothing(pair, order):
    pred, ref = (text.strip() for text in pair)
    # sacrebleu: same 13a tokens, its own n-gram counting, no smoothing, no effective order; 0-100 scale.
    scorer = BLEU(max_ngram_order=order, smooth_method="none", tokenize="13a", effective_order=False)
    want = scorer.corpus_score([pred], [[ref]]).score / 100.0
    # Both compute exp(mean log p) * BP in float64 from the same small integer counts: 1e-12 is
    # far above their last-bit differences and far below any real difference.
    assert bleu(pred, ref, order) == pytest.approx(want, abs=1e-12)


def test_bleu_hand_case_and_zero_rules():
    # pred "the the the cat" vs "the cat sat": clipped unigrams 2/4; bigrams: "the cat" 1/3; c > r: BP 1.
    assert bleu("the the the cat", "the cat sat", 1) == pytest.approx(0.5, abs=1e-15)
    want = math.sqrt(float(Fraction(1, 2) * Fraction(1, 3)))
    assert bleu("the the the cat", "the cat sat", 2) == pytest.approx(want, rel=1e-14)
    # shorter than the reference: BP exp(1 - 3/2)
    assert bleu("the cat", "the cat sat", 1) == pytest.approx(math.exp(1 - 1.5), rel=1e-14)
    assert bleu("Yes", "Yes", 1) == 1.0 and bleu("Yes", "Yes", 2) == 0.0  # no bigram at all: 0
    assert bleu("yes", "Yes", 1) == 0.0  # case is kept
    assert bleu("", "No.", 1) == 0.0 and bleu("No.", "", 1) == 0.0 and bleu("", "", 4) == 0.0
    assert bleu_tokens("It is [SEG], (left).") == ("It", "is", "[", "SEG", "]", ",", "(", "left", ")", ".")


def _rouge_tokens(text):
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _f(overlap, n_pred, n_ref):
    if overlap == 0:
        return 0.0
    p, r = Fraction(overlap, n_pred), Fraction(overlap, n_ref)
    return float(2 * p * r / (p + r))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rouge_equals_a_hand_written_rouge_without_stemming():
    got = m3d_sample_scores([p for p, _ in PAIRS], [a for _, a in PAIRS])
    for (pred, ref), r1, rl in zip(PAIRS, got["rouge1"], got["rougeL"]):
        hyp, gold = _rouge_tokens(pred), _rouge_tokens(ref)
        unigram = sum(min(hyp.count(w), gold.count(w)) for w in set(hyp))
        assert r1 == pytest.approx(_f(unigram, len(hyp), len(gold)), abs=1e-15), (pred, ref)
        assert rl == pytest.approx(_f(_lcs(hyp, gold), len(hyp), len(gold)), abs=1e-15), (pred, ref)
    # "bleeding" vs "bleed": no stemming in this protocol
    assert m3d_sample_scores(["bleeding"], ["bleed"])["rouge1"] == [0.0]


WORD_TOKENS = {
    "There's no midline shift; no mass effect.": ["There", "'s", "no", "midline", "shift", ";", "no", "mass", "effect", "."],
    "No. There is no bleed.": ["No", ".", "There", "is", "no", "bleed", "."],
    "It is [SEG].": ["It", "is", "[", "SEG", "]", "."],
    "YES, THERE IS AN EPIDURAL BLEED!": ["YES", ",", "THERE", "IS", "AN", "EPIDURAL", "BLEED", "!"],
    "mass effect isn't seen": ["mass", "effect", "is", "n't", "seen"],
    "": [],
}  # fmt: skip


def test_word_tokens_split_like_word_tokenize():
    for text, tokens in WORD_TOKENS.items():
        assert list(word_tokens(text)) == tokens, text


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_meteor_is_nltk_single_meteor_on_word_tokens():
    got = m3d_sample_scores([p for p, _ in PAIRS], [a for _, a in PAIRS])["meteor"]
    wordnet = require_wordnet()
    for (pred, ref), value in zip(PAIRS, got):
        want = single_meteor_score(
            list(word_tokens(ref.strip())), list(word_tokens(pred.strip())), wordnet=wordnet
        )
        assert value == pytest.approx(want, abs=1e-12), (pred, ref)
    assert got[1] == 0.0 and got[0] > 0.99  # empty prediction; exact match (fragmentation keeps it < 1)
    # case does not matter to METEOR (single_meteor_score lowercases), unlike BLEU
    assert got[3] == pytest.approx(single_meteor_score(["yes"], ["yes"], wordnet=wordnet))


class _Pick:
    """Stands in for the training rng: always picks option `index`."""

    def __init__(self, index: int) -> None:
        self.index = index

    def choice(self, options):
        return options[self.index]


def _every_answer() -> set[str]:
    """Every answer the phrasing rules can write: open (all findings, all frames), closed and seg."""
    answers = set()
    keys = list(phrasing.TYPE_NAMES) + ["ICH", "BleedLocation-Left", "BleedLocation-Right"]
    for values in itertools.product([0, 1], repeat=len(keys)):
        for index in range(len(phrasing.OPEN_YES)):
            answers.add(phrasing.open_answer(dict(zip(keys, values)), _Pick(index)))
    for finding in phrasing.CLOSED_FINDINGS:
        for value, index in itertools.product((0, 1), range(len(phrasing.CLOSED_YES))):
            answers.add(phrasing.closed_answer(finding, value, _Pick(index)))
    return answers | set(phrasing.SEG_YES) | set(phrasing.SEG_NO) | set(phrasing.OPEN_NO)


def test_untrained_punkt_is_word_tokenize_on_every_phrased_answer():
    # word_tokenize = Punkt sentences, then NLTKWordTokenizer per sentence. The English Punkt model can
    # only differ from the untrained one where a text has a sentence-final mark before its end; no
    # answer the project writes has one, so both give the tokens of the whole line.
    answers = _every_answer()
    assert len(answers) > 100
    line = NLTKWordTokenizer()
    differ = [a for a in answers if list(word_tokens(a)) != line.tokenize(a)]
    assert differ == []
    assert not [a for a in answers if re.search(r"[.!?]\s+\S", a)]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compute_metrics_m3d_is_the_mean_of_samples():
    records = [
        {"prediction": p, "answer": a, "kind": "open", "id": f"p{i}:q"} for i, (p, a) in enumerate(PAIRS)
    ]
    got = compute_metrics(records, "m3d", resamples=200)
    per_sample = m3d_sample_scores([p for p, _ in PAIRS], [a for _, a in PAIRS])
    assert got["protocol"] == "m3d" and got["n_text"] == len(PAIRS)
    for key, values in per_sample.items():
        assert got[key] == pytest.approx(math.fsum(values) / len(values), abs=1e-15)
        low, high = got["ci95"][key]
        assert low <= got[key] <= high
    assert not [k for k in got if k.endswith("_sent") or k == "rouge2"]
    json.dumps(got, allow_nan=False)
    with pytest.raises(ValueError, match="unknown protocol 'bleu'"):
        compute_metrics(records, "bleu")


def test_score_protocol_option(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prediction": "Yes.", "answer": "Yes, there is a fracture."}) + "\n")
    with pytest.raises(InputError, match="--protocol: invalid choice: 'sacre'"):
        score_main([str(path), "--protocol", "sacre"])
    assert score_main([str(path), "--out", str(tmp_path / "m.json"), "--bootstrap", "0"]) == 0
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["protocol"] == "m3d" and "bootstrap" not in written and "ci95" not in written
    assert "bleu1 [m3d]" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["score", "eval", "bench"])
def test_unknown_protocol_is_refused_by_every_command(command, capsys):
    from m3d_lit.cli import main

    assert main([command, "--protocol", "bleurt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--protocol: invalid choice: 'bleurt' (choose from 'm3d', 'corpus')" in err
