"""The `corpus` text protocol: corpus-level BLEU, smoothed sentence BLEU, stemmed ROUGE, METEOR.

It calls nltk's and Google's `rouge-score` reference implementations, so values equal theirs; the speed
comes from computing each sample once and caching the tokenizer, scorer, stemmer and WordNet look-ups,
never from re-implementing the formulas. `bleu_counts` and `corpus_bleu_from_counts` give corpus BLEU
from per-sample counts (the bootstrap resamples them). The `m3d` protocol is `m3d_protocol.py`.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from m3d_lit.evaluation.wordnet import meteor_tools, stemmer

__all__ = ["bleu_counts", "corpus_bleu", "corpus_bleu_from_counts", "sample_scores", "tokenize"]

BLEU_WEIGHTS = [tuple([1.0 / n] * n) for n in range(1, 5)]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class _RougeTokenizer:
    """`rouge-score`'s own tokenizer (what `use_stemmer=True` builds), given the memoised stemmer."""

    def __init__(self, stemmer: Any) -> None:
        self._stemmer = stemmer

    def tokenize(self, text: str) -> list[str]:
        from rouge_score.tokenize import tokenize

        return tokenize(text, self._stemmer)


@functools.lru_cache(maxsize=1)
def _scorers() -> tuple[Any, Any]:
    """Built once: the Treebank tokenizer and the ROUGE scorer (with the shared memoised stemmer)."""
    from nltk.tokenize import TreebankWordTokenizer
    from rouge_score.rouge_scorer import RougeScorer

    rouge = RougeScorer(list(ROUGE_TYPES), use_stemmer=True, tokenizer=_RougeTokenizer(stemmer()))
    return TreebankWordTokenizer(), rouge


def tokenize(text: str) -> list[str]:
    """Lowercased text split by nltk's `TreebankWordTokenizer` (needs no downloaded data)."""
    return list(_tokens(text))


@functools.lru_cache(maxsize=1 << 18)
def _tokens(text: str) -> tuple[str, ...]:
    # Answers repeat ("No.", templated findings), and nltk's guarded regexes cost ~0.2 ms a call.
    return tuple(_scorers()[0].tokenize(text.lower()))


def sample_scores(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, list[float]]:
    """Per-sample sentence BLEU-1..4 (method1 smoothing), ROUGE-1/2/L F1 and METEOR, in input order."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.meteor_score import meteor_score

    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    wordnet, stem = meteor_tools()
    rouge = _scorers()[1]
    smooth = SmoothingFunction().method1
    out: dict[str, list[float]] = defaultdict(list)
    for pred, ans in zip(predictions, answers):
        hyp, ref = tokenize(pred), tokenize(ans)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns on every zero n-gram count
            bleus = sentence_bleu([ref], hyp, weights=BLEU_WEIGHTS, smoothing_function=smooth)
        for n, value in enumerate(bleus, start=1):
            out[f"bleu{n}_sent"].append(float(value))
        for key, score in rouge.score(ans, pred).items():
            out[key].append(float(score.fmeasure))
        out["meteor"].append(float(meteor_score([ref], hyp, stemmer=stem, wordnet=wordnet)))
    return dict(out)


def corpus_bleu(predictions: Iterable[str], answers: Iterable[str]) -> dict[str, float]:
    """Corpus-level BLEU-1..4 (nltk `corpus_bleu`, uniform weights, no smoothing) on `tokenize`d texts."""
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(a)] for a in answers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = nltk_corpus_bleu(refs, hyps, weights=BLEU_WEIGHTS)
    return {f"bleu{n}": float(v) for n, v in enumerate(values, start=1)}


def bleu_counts(predictions: list[str], answers: list[str]) -> np.ndarray:
    """Per sample what nltk's `corpus_bleu` adds up: matches and n-grams of orders 1-4, both lengths."""
    from nltk.translate.bleu_score import modified_precision

    rows = []
    for pred, ans in zip(predictions, answers):
        hyp, ref = tokenize(pred), tokenize(ans)
        fractions = [modified_precision([ref], hyp, n) for n in range(1, 5)]
        rows.append(
            [f.numerator for f in fractions] + [f.denominator for f in fractions] + [len(hyp), len(ref)]
        )
    return np.array(rows, dtype=np.float64)


def corpus_bleu_from_counts(summed: np.ndarray) -> np.ndarray:
    """BLEU-1..4 as nltk's `corpus_bleu` (no smoothing) computes them from summed counts.

    Args:
        summed: (..., 10) matches of orders 1-4, n-grams of orders 1-4, hypothesis and reference length.
    """
    num, den, hyp, ref = summed[..., :4], summed[..., 4:8], summed[..., 8], summed[..., 9]
    with np.errstate(divide="ignore", invalid="ignore"):
        # nltk's method0: an order without matches counts as the smallest float, i.e. BLEU ~ 0
        logs = np.log(np.where(num > 0, num / np.maximum(den, 1), sys.float_info.min))
        penalty = np.where(hyp > ref, 1.0, np.where(hyp == 0, 0.0, np.exp(1.0 - ref / np.maximum(hyp, 1))))
    orders = np.arange(1, 5)
    values = penalty[..., None] * np.exp(np.cumsum(logs, axis=-1) / orders)
    return np.where(num[..., :1] > 0, values, 0.0)
