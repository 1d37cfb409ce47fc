"""How report.md says each metric is computed: libraries and their versions, protocols, rules."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version

from m3d_lit.data.sources import SOURCES, reference_for
from m3d_lit.data.sources.references import M3D_2024
from m3d_lit.evaluation.wordnet import require_wordnet

__all__ = ["metric_definitions"]


def metric_definitions(protocol: str = "m3d", datasets: Sequence[str] = ()) -> list[str]:
    """How each metric is computed, in words, with library and WordNet versions (for the report).

    Args:
        protocol: the text-metric protocol, `m3d` or `corpus`.
        datasets: the `dataset` values the report covers (which published question-answer records to name).
    """
    lines = [f"Text metrics follow the `{protocol}` protocol (`--protocol`); each name says so."]
    text = _text_definitions(protocol, require_wordnet().get_version())
    return lines + text + _other_definitions(datasets)


def _text_definitions(protocol: str, wordnet: str) -> list[str]:
    if protocol == "m3d":
        return [
            f"`m3d` is M3D's own `Bench/eval/eval_vqa.py` ({M3D_2024.short}, github.com/BAAI-DCAI/M3D): each "
            "sample scored alone (texts stripped), then the mean over samples.",
            "BLEU-n (m3d): Hugging Face `evaluate`'s `bleu` with `max_order=n`: sacrebleu "
            f"{version('sacrebleu')}'s 13a tokens (case kept), modified n-gram precision of orders 1..n, "
            "uniform weights, no smoothing (0 when an order has no match), brevity penalty exp(1 - r/c) "
            "when c < r; an empty prediction or reference scores 0 (where `evaluate` divides by zero).",
            f"ROUGE-1 and ROUGE-L (m3d): F-measure of `rouge-score` {version('rouge-score')} without "
            "stemming (its lowercasing, alphanumeric tokens).",
            f"METEOR (m3d): nltk {version('nltk')} `single_meteor_score`, alpha 0.9, beta 3, gamma 0.5, "
            f"Porter stemmer, WordNet {wordnet}, on `word_tokenize`'s two steps with an untrained Punkt "
            "sentence splitter (nltk's English model is not installable offline); the same tokens for every "
            "text with at most one sentence-final mark.",
            "BERTScore F1 (m3d, only with `--bertscore-model DIR`): `bert_score`'s greedy cosine matching of "
            "the local model's layer-L token vectors (no idf, no rescaling; L = 17 for roberta-large, "
            "`evaluate`'s English default, else the last layer or `--bertscore-layer`).",
        ]
    return [
        "Tokens: the text lowercased, then split by nltk's `TreebankWordTokenizer` "
        f"(nltk {version('nltk')}).",
        "BLEU-n (corpus) (`bleu1`..`bleu4`): corpus-level BLEU over all samples of the group, uniform "
        "weights 1/n up to n-grams, no smoothing, nltk `corpus_bleu` on those tokens.",
        "Sentence BLEU-n (corpus) (`bleu1_sent`..`bleu4_sent`): mean over samples of nltk `sentence_bleu`, "
        "uniform weights up to n, `SmoothingFunction().method1` (epsilon 0.1 for zero n-gram counts).",
        "ROUGE-1/2/L (corpus): mean over samples of the F1 of Google's `rouge-score` "
        f"{version('rouge-score')} (`RougeScorer(use_stemmer=True)`, its own lowercasing, "
        "alphanumeric tokenizer and Porter stemmer) on the raw prediction and reference strings.",
        f"METEOR (corpus): mean over samples of nltk `meteor_score` on the tokens, WordNet {wordnet} "
        "synonyms, nltk `PorterStemmer`, alpha 0.9, beta 3, gamma 0.5. Never falls back to exact match.",
    ]


def _other_definitions(datasets: Sequence[str]) -> list[str]:
    covered = [
        SOURCES[name].table1_records
        for name in datasets
        if reference_for(name, "qa") is not None and SOURCES[name].table1_records
    ]
    scope = f" ({'; '.join(covered)}, as the published rows)" if covered else ""
    return [
        f"The question-answer table covers the question-answer records only{scope}; segmentation "
        "and box samples are scored in their own tables.",
        "Closed questions: samples whose reference starts with Yes/No (kind `closed` when given). "
        "A prediction counts as Yes/No by its first word (case, spaces and punctuation ignored); "
        "any other prediction counts as wrong. Yes is positive: sensitivity, specificity, F1 (0 when "
        "there are no positives at all); balanced accuracy = mean recall over the classes present. The "
        "majority baseline always answers the group's most frequent reference (ties: No). AUROC ranks "
        "`p_yes` (ties count half); with a single class it is undefined and reported as such.",
        "`p_yes` (from `m3d-lit eval`): softmax over the two logits of the answer's first token, `Yes` "
        "against `No`, at the first generated position (the same forward pass as the greedy answer).",
        "Confidence intervals: 2.5th-97.5th percentile over bootstrap resamples of patients (all records "
        "of a drawn patient, as often as drawn), seeded; `metrics.json` `bootstrap` gives the count and seed.",
        "Segmentation: per sample, mask = sigmoid(logits) > 0.5; Dice = 2|P&T|/(|P|+|T|), "
        "IoU = |P&T|/|P or T| (both 1 when both masks are empty); the table shows means over samples.",
    ]
