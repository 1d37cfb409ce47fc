"""`compute_metrics`: every score of a list of prediction records, per group, with bootstrap intervals.

Groups: all records, each `dataset` and each `kind`. In every group but a kind's own, the text metrics
(the rows of the paper's Table 1) cover the question-answer records only: segmentation and box
samples (`SEPARATE_KINDS`) are scored in their own tables (`by_kind`, Dice), never mixed in. Each
group says how many records its text metrics cover (`n_text`) and of which kinds (`text_kinds`).
All records and each dataset also get patient-level bootstrap 95% intervals (`ci95`) of every number
the report's main tables show.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3d_lit.evaluation.bertscore import bertscore_f1
from m3d_lit.evaluation.bootstrap import (
    RESAMPLES,
    SEED,
    interval,
    patient_of,
    patient_weights,
    weighted_means,
)
from m3d_lit.evaluation.closed import closed_metrics, closed_scores, parse_closed
from m3d_lit.evaluation.m3d_protocol import m3d_sample_scores
from m3d_lit.evaluation.metrics import corpus_bleu, sample_scores, tokenize
from m3d_lit.evaluation.open_findings import open_scores

__all__ = ["PROTOCOLS", "SEPARATE_KINDS", "check_p_yes", "compute_metrics", "corpus_bleu_from_counts"]

PROTOCOLS = ("m3d", "corpus")
SEPARATE_KINDS = ("seg", "rec", "reg")


@dataclass
class _Scored:
    records: list[dict]
    protocol: str
    scores: dict[str, np.ndarray]  # per-sample text scores
    bleu_counts: np.ndarray | None  # corpus protocol: per-sample n-gram counts and lengths
    resamples: int
    seed: int


def check_p_yes(value: Any) -> str | None:
    """What is wrong with a `p_yes` value (None when it is a number in [0, 1] or absent)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return f"'p_yes' must be a number in [0, 1], got {value!r}"
    return None


def _check(records: list[dict]) -> None:
    if not records:
        raise ValueError("compute_metrics needs at least one record, got none")
    for i, record in enumerate(records):
        for key in ("prediction", "answer"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"record {i} needs a string {key!r}, got {record.get(key)!r}")
        if (record.get("dice") is None) != (record.get("iou") is None):
            raise ValueError(f"record {i} has only one of 'dice' and 'iou'")
        for key in ("dice", "iou"):
            if record.get(key) is not None and not math.isfinite(float(record[key])):
                raise ValueError(f"record {i} has a non-finite {key!r}: {record[key]!r}")
        problem = check_p_yes(record.get("p_yes"))
        if problem:
            raise ValueError(f"record {i}: {problem}")


def _bleu_counts(predictions: list[str], answers: list[str]) -> np.ndarray:
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


def _text(ctx: _Scored, index: list[int], weights: np.ndarray | None) -> dict[str, Any]:
    chosen = [ctx.records[i] for i in index]
    kinds = sorted({str(r.get("kind") or "unspecified") for r in chosen})
    out: dict[str, Any] = {"n_text": len(index), "text_kinds": kinds}
    if ctx.protocol == "corpus":
        out.update(corpus_bleu([r["prediction"] for r in chosen], [r["answer"] for r in chosen]))
    for key, values in ctx.scores.items():
        out[key] = math.fsum(values[index]) / len(index)
    if weights is not None:
        ci = {key: interval(weighted_means(weights, values[index])) for key, values in ctx.scores.items()}
        if ctx.bleu_counts is not None:
            resampled = corpus_bleu_from_counts(weights @ ctx.bleu_counts[index])
            ci.update({f"bleu{n}": interval(resampled[:, n - 1]) for n in range(1, 5)})
        out["ci95"] = ci
    return out


def _is_closed(record: dict) -> bool:
    return record.get("kind") in (None, "closed") and parse_closed(record["answer"]) is not None


def _closed(records: list[dict], weights: np.ndarray | None) -> dict[str, Any]:
    overall = closed_metrics(
        [parse_closed(r["answer"]) for r in records], [parse_closed(r["prediction"]) for r in records]
    )
    result = {
        "n_closed": overall.pop("n"),
        "closed_positives": overall.pop("positives"),
        "closed_unparsed": overall.pop("unparsed"),
        **overall,
    }
    result["closed"] = closed_scores(records, weights)
    return result


def _seg(records: list[dict], weights: np.ndarray | None) -> dict[str, Any]:
    out: dict[str, Any] = {"n_seg": len(records)}
    ci = {}
    for key in ("dice", "iou"):
        values = np.array([float(r[key]) for r in records])
        out[key] = math.fsum(values) / len(values)
        if weights is not None:
            ci[key] = interval(weighted_means(weights, values))
    if ci:
        out["ci95_seg"] = ci
    return out


def _summarise(ctx: _Scored, index: list[int], separate: Collection[str], ci: bool) -> dict[str, Any]:
    """Every key for one group of records (given by their positions in `ctx.records`)."""
    records = [ctx.records[i] for i in index]
    weights = None
    if ci and ctx.resamples > 0:
        weights = patient_weights([patient_of(ctx.records[i], i) for i in index], ctx.resamples, ctx.seed)
    result: dict[str, Any] = {"n": len(index)}
    text = [k for k, r in enumerate(records) if r.get("kind") not in separate]
    if text:
        part = None if weights is None else weights[:, text]
        result.update(_text(ctx, [index[k] for k in text], part))
    for select, score in ((_is_closed, _closed), (lambda r: r.get("dice") is not None, _seg)):
        chosen = [k for k, r in enumerate(records) if select(r)]
        if chosen:
            result.update(
                score([records[k] for k in chosen], None if weights is None else weights[:, chosen])
            )
    found = open_scores(records, weights)
    if found is not None:
        result["open_findings"] = found
    return result


def _by_field(ctx: _Scored, separate: Collection[str]) -> dict[str, Any]:
    """`by_dataset` (text metrics without `separate` kinds, with intervals) and `by_kind` (each kind's own)."""
    out = {}
    for field in ("dataset", "kind"):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, record in enumerate(ctx.records):
            if record.get(field) is not None:
                groups[str(record[field])].append(i)
        if groups:
            own = separate if field == "dataset" else ()
            out[f"by_{field}"] = {
                name: _summarise(ctx, idx, own, ci=field == "dataset") for name, idx in sorted(groups.items())
            }
    return out


def compute_metrics(
    records: list[dict],
    protocol: str = "m3d",
    separate: Collection[str] = SEPARATE_KINDS,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    bertscore_model: str | None = None,
    bertscore_layer: int | None = None,
) -> dict[str, Any]:
    """All metrics for all records, plus the same keys per `dataset` and per `kind` (when given).

    Records need `prediction` and `answer` strings; optional `kind`, `question`, `finding`, `dataset`,
    `patient`, `p_yes` (closed answers: the model's probability of Yes, in [0, 1]) and per-sample
    `dice`/`iou` (segmentation). Keys that do not apply are absent; no NaN.

    Args:
        records: the prediction records.
        protocol: `m3d` (per-sample scores as M3D's evaluation) or `corpus` (corpus BLEU and more).
        separate: kinds kept out of the text metrics of all records and of each dataset.
        resamples: patient-level bootstrap resamples for `ci95` (0: none).
        seed: the bootstrap's seed.
        bertscore_model: `m3d` only: a local model directory; adds per-sample `bertscore_f1`.
        bertscore_layer: its hidden layer (default: `bertscore.default_layer`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if bertscore_model is not None and protocol != "m3d":
        raise ValueError("BERTScore belongs to the m3d protocol; use protocol 'm3d' with a BERTScore model")
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")
    _check(records)
    predictions, answers = [r["prediction"] for r in records], [r["answer"] for r in records]
    if protocol == "m3d":
        raw = m3d_sample_scores(predictions, answers)
        if bertscore_model is not None:
            raw["bertscore_f1"] = bertscore_f1(predictions, answers, bertscore_model, bertscore_layer)
    else:
        raw = sample_scores(predictions, answers)
    counts = _bleu_counts(predictions, answers) if protocol == "corpus" and resamples else None
    scores = {key: np.asarray(values, dtype=np.float64) for key, values in raw.items()}
    ctx = _Scored(records, protocol, scores, counts, resamples, seed)
    result = {"protocol": protocol, **_summarise(ctx, list(range(len(records))), separate, ci=True)}
    result.update(_by_field(ctx, separate))
    if bertscore_model is not None:
        result["bertscore"] = {"model": str(bertscore_model), "layer": bertscore_layer}
    if resamples:
        result["bootstrap"] = {"resamples": resamples, "seed": seed, "unit": "patient", "level": 0.95}
    return result
