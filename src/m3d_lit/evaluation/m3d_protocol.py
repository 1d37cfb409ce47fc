"""The `m3d` protocol: per-sample text scores as M3D's own `Bench/eval/eval_vqa.py` computes them.

M3D scores one sample at a time with Hugging Face `evaluate` (texts stripped first) and averages the
samples; the brain-CT study's Table 1 (`data/sources/references.py`) reports BLEU-1..4, ROUGE and
METEOR that way. This module reproduces each
score without `evaluate` or the hub:

- BLEU-n: `evaluate`'s `bleu` (`max_order=n`): sacrebleu's 13a tokenizer (case kept), modified n-gram
  precision for orders 1..n, uniform weights, no smoothing (0 when an order has no match or the
  prediction is shorter than n tokens), brevity penalty exp(1 - r/c) when c < r. `evaluate` divides
  by zero on an empty prediction or reference; here such a sample scores 0.
- ROUGE-1 and ROUGE-L: F-measure of Google's `rouge-score`, `use_stemmer=False` (what `evaluate`'s
  `rouge` runs; its aggregate of one sample is that sample's value).
- METEOR: nltk `single_meteor_score` with its defaults (alpha 0.9, beta 3, gamma 0.5, Porter stemmer,
  WordNet 3.0, tokens lowercased) on `word_tokenize`d texts. nltk's trained English Punkt model
  (`punkt_tab`), which `word_tokenize` splits sentences with, ships neither on PyPI nor in Debian, so
  `word_tokens` runs the same two steps with an untrained Punkt: it can split differently only after a
  period the English model knows as an abbreviation ("Dr.", "e.g."), never in a text with at most one
  sentence-final mark, which is every answer `m3d_lit.data.phrasing` writes.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from m3d_lit.evaluation.wordnet import meteor_tools

__all__ = ["M3D_KEYS", "bleu", "bleu_tokens", "m3d_sample_scores", "word_tokens"]

M3D_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "meteor")


@functools.lru_cache(maxsize=1)
def _tokenizer_13a() -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


@functools.lru_cache(maxsize=1 << 16)
def bleu_tokens(text: str) -> tuple[str, ...]:
    """The tokens `evaluate`'s `bleu` counts: sacrebleu's 13a tokenizer, split on spaces."""
    return tuple(_tokenizer_13a()(text.strip()).split())


def _ngrams(tokens: Sequence[str], order: int) -> Counter:
    return Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))


def bleu(prediction: str, reference: str, max_order: int) -> float:
    """BLEU-`max_order` of one prediction against one reference, as `evaluate`'s `bleu` computes it."""
    hyp, ref = bleu_tokens(prediction), bleu_tokens(reference)
    if not hyp or not ref:
        return 0.0
    log_sum = 0.0
    for order in range(1, max_order + 1):
        possible = len(hyp) - order + 1
        if possible <= 0:
            return 0.0
        matches = sum((_ngrams(hyp, order) & _ngrams(ref, order)).values())
        if matches == 0:
            return 0.0
        log_sum += math.log(matches / possible) / max_order
    ratio = len(hyp) / len(ref)
    penalty = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
    return math.exp(log_sum) * penalty


@functools.lru_cache(maxsize=1)
def _word_tokenizers() -> tuple[Any, Any]:
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(), NLTKWordTokenizer()


@functools.lru_cache(maxsize=1 << 16)
def word_tokens(text: str) -> tuple[str, ...]:
    """nltk `word_tokenize`'s two steps (Punkt sentences, then its Treebank-style word tokenizer),
    with an untrained Punkt standing in for the English model (see the module docstring)."""
    sentences, words = _word_tokenizers()
    return tuple(token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence))


@functools.lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def m3d_sample_scores(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, list[float]]:
    """Per-sample `bleu1`..`bleu4`, `rouge1`, `rougeL` and `meteor` (the keys of `M3D_KEYS`), in order."""
    from nltk.translate.meteor_score import single_meteor_score

    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    wordnet, stemmer = meteor_tools()
    out: dict[str, list[float]] = {key: [] for key in M3D_KEYS}
    for raw_pred, raw_ans in zip(predictions, answers):
        pred, ans = raw_pred.strip(), raw_ans.strip()
        for n in range(1, 5):
            out[f"bleu{n}"].append(bleu(pred, ans, n))
        rouge = _rouge().score(ans, pred)
        out["rouge1"].append(float(rouge["rouge1"].fmeasure))
        out["rougeL"].append(float(rouge["rougeL"].fmeasure))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meteor = single_meteor_score(
                list(word_tokens(ans)), list(word_tokens(pred)), stemmer=stemmer, wordnet=wordnet
            )
        out["meteor"].append(float(meteor))
    return out
