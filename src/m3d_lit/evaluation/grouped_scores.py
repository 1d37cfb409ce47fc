"""`compute_metrics`: every score of a list of prediction records, per group, with bootstrap intervals.

Groups: all records, each `dataset` and each `kind`. In every group but a kind's own, the text metrics
(the rows of the brain-CT study's Table 1, `data/sources/references.py`) cover the question-answer records only: segmentation and box
samples (`SEPARATE_KINDS`) are scored in their own tables (`by_kind`, Dice), never mixed in. Each
group says how many records its text metrics cover (`n_text`) and of which kinds (`text_kinds`).
All records and each dataset also get patient-level bootstrap 95% intervals (`ci95`) of every number
the report's main tables show.
"""

from __future__ import annotations

import math
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
from m3d_lit.evaluation.corpus_protocol import (
    bleu_counts,
    corpus_bleu,
    corpus_bleu_from_counts,
    sample_scores,
)
from m3d_lit.evaluation.m3d_protocol import m3d_sample_scores
from m3d_lit.evaluation.open_findings import open_scores
from m3d_lit.evaluation.predictions import check_records

__all__ = ["PROTOCOLS", "SEPARATE_KINDS", "compute_metrics"]

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
    check_records(records)
    predictions, answers = [r["prediction"] for r in records], [r["answer"] for r in records]
    if protocol == "m3d":
        raw = m3d_sample_scores(predictions, answers)
        if bertscore_model is not None:
            raw["bertscore_f1"] = bertscore_f1(predictions, answers, bertscore_model, bertscore_layer)
    else:
        raw = sample_scores(predictions, answers)
    counts = bleu_counts(predictions, answers) if protocol == "corpus" and resamples else None
    scores = {key: np.asarray(values, dtype=np.float64) for key, values in raw.items()}
    ctx = _Scored(records, protocol, scores, counts, resamples, seed)
    result = {"protocol": protocol, **_summarise(ctx, list(range(len(records))), separate, ci=True)}
    result.update(_by_field(ctx, separate))
    if bertscore_model is not None:
        result["bertscore"] = {"model": str(bertscore_model), "layer": bertscore_layer}
    if resamples:
        result["bootstrap"] = {"resamples": resamples, "seed": seed, "unit": "patient", "level": 0.95}
    return result
