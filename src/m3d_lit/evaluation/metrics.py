"""Offline answer metrics: BLEU-1..4, ROUGE, METEOR, closed Yes/No scores, Dice/IoU.

One definition, shared by `m3d-lit score`, `m3d-lit eval`, `m3d-lit bench` and the report (which states
it in words). Two text protocols: `m3d` (per sample as M3D's own evaluation, `m3d_protocol.py`) and
`corpus` (this module: corpus-level BLEU, smoothed sentence BLEU, ROUGE with stemming, METEOR). Both
call nltk's and Google's `rouge-score` reference implementations, so values equal theirs; the speed
comes from computing each sample once and caching the tokenizer, scorer, stemmer and WordNet
look-ups, never from re-implementing the formulas. `compute_metrics` (groups, clinical scores and
bootstrap intervals) lives in `scoring.py`.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.errors import InputError
from m3d_lit.evaluation.closed import closed_metrics, parse_closed

__all__ = [
    "WordNetMissingError",
    "closed_metrics",
    "corpus_bleu",
    "dice_iou",
    "nltk_data_dirs",
    "parse_closed",
    "require_wordnet",
    "meteor_tools",
    "sample_scores",
    "tokenize",
]

BLEU_WEIGHTS = [tuple([1.0 / n] * n) for n in range(1, 5)]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_WORDNET_VERSION = "3.0"


class WordNetMissingError(InputError):
    """WordNet 3.0, which METEOR needs, is not in the nltk data folder (the message says how to fix it)."""


def nltk_data_dirs() -> list[Path]:
    """Where WordNet is looked for: the `NLTK_DATA` folders if set, else `<sys.prefix>/nltk_data`.

    `make setup` writes `.venv/nltk_data`, and `.venv` is `sys.prefix` when run from the venv, so
    `.venv/bin/m3d-lit score` needs no environment variable.
    """
    env = os.environ.get("NLTK_DATA", "")
    if env.strip():
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [Path(sys.prefix) / "nltk_data"]


def require_wordnet() -> Any:
    """The WordNet 3.0 reader METEOR uses; raises `WordNetMissingError` saying how to install it."""
    return _load_wordnet(tuple(str(d) for d in nltk_data_dirs()))


@functools.lru_cache(maxsize=4)
def _load_wordnet(dirs: tuple[str, ...]) -> Any:
    import nltk

    for folder in dirs:
        if not Path(folder, "corpora").is_dir():
            continue
        # nltk only reads corpora under its data path (a security check), so the folder joins it.
        if folder not in nltk.data.path:
            nltk.data.path.insert(0, folder)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a refusal warns; the error below says it better
                root = nltk.data.find("corpora/wordnet", paths=[folder])
        except LookupError:
            if Path(folder, "corpora", "wordnet", "lexnames").is_file():
                raise WordNetMissingError(
                    Path(folder, "corpora", "wordnet"),
                    "WordNet is there but nltk will not read it: it or a file in it is writable by "
                    "another account or owned by another user. Fix: `chmod -R go-w` that folder, or "
                    "re-run `make setup`",
                ) from None
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed
            reader = _english_wordnet_class()(root, None)
        found = reader.get_version()
        if found != _WORDNET_VERSION:
            raise WordNetMissingError(
                f"{folder}/corpora/wordnet",
                f"holds WordNet {found}, but METEOR here is defined with WordNet {_WORDNET_VERSION}; "
                "run `make setup` into a fresh folder or point NLTK_DATA at WordNet 3.0",
            )
        return reader
    raise WordNetMissingError(
        os.pathsep.join(dirs),
        "WordNet 3.0 is missing (METEOR needs it; looked for corpora/wordnet/ with lexnames in "
        "NLTK_DATA, or in <venv>/nltk_data when NLTK_DATA is unset). Fix: run `make setup` (writes "
        ".venv/nltk_data offline from Debian's wordnet-base), or `bash scripts/setup_wordnet.sh DIR` "
        "and set NLTK_DATA=DIR",
    )


def _english_wordnet_class() -> type:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishWordNet(WordNetCorpusReader):
        """nltk's reader without the sense map to WordNet 3.0 that only multilingual (OMW) data uses.

        This nltk builds that map at load even for WordNet 3.0 itself (8 s of reading index.sense
        twice); upstream skips it for 3.0. English `synsets`, all METEOR uses, never reads it.
        """

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    return EnglishWordNet


class _CachedStemmer:
    """nltk's Porter stemmer with memory: ROUGE and METEOR stem every token of every sample."""

    def __init__(self) -> None:
        from nltk.stem.porter import PorterStemmer

        self.stem = functools.lru_cache(maxsize=None)(PorterStemmer().stem)


class _RougeTokenizer:
    """`rouge-score`'s own tokenizer (what `use_stemmer=True` builds), given the memoised stemmer."""

    def __init__(self, stemmer: _CachedStemmer) -> None:
        self._stemmer = stemmer

    def tokenize(self, text: str) -> list[str]:
        from rouge_score.tokenize import tokenize

        return tokenize(text, self._stemmer)


class _CachedWordNet:
    """The one WordNet call METEOR makes (`synsets`), memoised: answers repeat the same few words."""

    def __init__(self, reader: Any) -> None:
        self._synsets = functools.lru_cache(maxsize=None)(reader.synsets)

    def synsets(self, word: str) -> Any:
        return self._synsets(word)


@functools.lru_cache(maxsize=1)
def _scorers() -> tuple[Any, Any, Any]:
    """Built once: the Treebank tokenizer, the ROUGE scorer and the Porter stemmer METEOR uses."""
    from nltk.tokenize import TreebankWordTokenizer
    from rouge_score.rouge_scorer import RougeScorer

    stemmer = _CachedStemmer()
    rouge = RougeScorer(list(ROUGE_TYPES), use_stemmer=True, tokenizer=_RougeTokenizer(stemmer))
    return TreebankWordTokenizer(), rouge, stemmer


def tokenize(text: str) -> list[str]:
    """Lowercased text split by nltk's `TreebankWordTokenizer` (needs no downloaded data)."""
    return list(_tokens(text))


@functools.lru_cache(maxsize=1 << 18)
def _tokens(text: str) -> tuple[str, ...]:
    # Answers repeat ("No.", templated findings), and nltk's guarded regexes cost ~0.2 ms a call.
    return tuple(_scorers()[0].tokenize(text.lower()))


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        tensor = array.detach().cpu()
        # numpy has no bfloat16; bool stays bool so a mask is not mistaken for logits.
        return tensor.float().numpy() if tensor.dtype.is_floating_point else tensor.numpy()
    return np.asarray(array)


def dice_iou(pred_logits_or_mask: Any, target: Any, threshold: float = 0.5) -> tuple[float, float]:
    """Dice and IoU of one sample's thresholded prediction against its mask (numpy or torch).

    Args:
        pred_logits_or_mask: float array = logits (foreground where sigmoid > `threshold`; a float
            {0, 1} mask also works at 0.5); bool/integer array = a mask (foreground where non-zero).
        target: the true mask, foreground where > 0.5; same shape as the prediction.
        threshold: probability threshold applied to the sigmoid of float predictions, in (0, 1).

    Both empty counts as a perfect match (1.0, 1.0): nothing to find and nothing predicted.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    pred, truth = _to_numpy(pred_logits_or_mask), _to_numpy(target)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {truth.shape}")
    if np.issubdtype(pred.dtype, np.floating):
        # sigmoid(x) > t  <=>  x > log(t / (1 - t)), without overflow in exp.
        pred_mask = pred.astype(np.float64) > math.log(threshold / (1.0 - threshold))
    else:
        pred_mask = pred != 0
    true_mask = truth.astype(np.float64) > 0.5
    inter = float(np.logical_and(pred_mask, true_mask).sum())
    total = float(pred_mask.sum() + true_mask.sum())
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / (total - inter)


def sample_scores(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, list[float]]:
    """Per-sample sentence BLEU-1..4 (method1 smoothing), ROUGE-1/2/L F1 and METEOR, in input order."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.meteor_score import meteor_score

    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    wordnet, stemmer = meteor_tools()
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
        out["meteor"].append(float(meteor_score([ref], hyp, stemmer=stemmer, wordnet=wordnet)))
    return dict(out)


def meteor_tools() -> tuple[Any, Any]:
    """nltk's WordNet 3.0 reader and Porter stemmer as METEOR calls them, memoised (same values)."""
    return _CachedWordNet(require_wordnet()), _scorers()[2]


def corpus_bleu(predictions: Iterable[str], answers: Iterable[str]) -> dict[str, float]:
    """Corpus-level BLEU-1..4 (nltk `corpus_bleu`, uniform weights, no smoothing) on `tokenize`d texts."""
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(a)] for a in answers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = nltk_corpus_bleu(refs, hyps, weights=BLEU_WEIGHTS)
    return {f"bleu{n}": float(v) for n, v in enumerate(values, start=1)}
