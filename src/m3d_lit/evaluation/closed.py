"""Closed Yes/No questions: per finding and pooled accuracy, sensitivity, specificity, balanced accuracy,
the always-majority baseline, and AUROC from each answer's `p_yes`.

A finding is a record's `finding` field when it has one, else its question text (whitespace
normalised). Yes is the positive class. A score that is undefined (sensitivity without positives,
AUROC with a single class or no `p_yes`) is None with a note, never NaN.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from m3d_lit.evaluation.bootstrap import auroc_rows, interval, weighted_auroc

__all__ = [
    "POOLED",
    "closed_metrics",
    "closed_scores",
    "finding_of",
    "parse_closed",
    "rate_intervals",
    "rates",
]

POOLED = "pooled"
_CLOSED = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
CI_KEYS = ("sensitivity", "specificity", "balanced_accuracy")


def parse_closed(text: str) -> int | None:
    """1 for an answer starting with Yes, 0 for No (any case, leading punctuation/space), else None."""
    match = _CLOSED.match(text or "")
    if match is None:
        return None
    return 1 if match.group(1).lower() == "yes" else 0


def finding_of(record: dict) -> str:
    if record.get("finding"):
        return str(record["finding"])
    return " ".join(str(record.get("question") or "(no question)").split())


def rates(truth: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, balanced accuracy and F1 (Yes positive), records weighted.

    Sensitivity (specificity) is None without positives (negatives); balanced accuracy is the mean of
    those defined, as scikit-learn defines it; F1 is 0 when there is no positive at all.
    """
    truth, pred = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    w = np.ones(truth.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    tp, fn = float(w[truth & pred].sum()), float(w[truth & ~pred].sum())
    tn, fp = float(w[~truth & ~pred].sum()), float(w[~truth & pred].sum())
    sensitivity = tp / (tp + fn) if tp + fn > 0 else None
    specificity = tn / (tn + fp) if tn + fp > 0 else None
    defined = [v for v in (sensitivity, specificity) if v is not None]
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": sum(defined) / len(defined),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0,
    }


def closed_metrics(truth: Sequence[int], predicted: Sequence[int | None]) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, balanced accuracy, F1 and the always-majority baseline.

    Args:
        truth: reference answers, 1 = Yes, 0 = No.
        predicted: parsed predictions; None (no Yes/No at the start) always counts as wrong.
    """
    if len(truth) != len(predicted) or not truth:
        raise ValueError(
            f"need equal, non-zero lengths, got {len(truth)} truths, {len(predicted)} predictions"
        )
    pred = [1 - t if p is None else p for t, p in zip(truth, predicted)]
    positives = sum(truth)
    majority = 1 if positives * 2 > len(truth) else 0  # ties go to No, the usual finding-absent answer
    baseline = rates(np.array(truth), np.full(len(truth), majority))
    return {
        "n": len(truth),
        "positives": positives,
        "unparsed": sum(p is None for p in predicted),
        **rates(np.array(truth), np.array(pred)),
        "majority_baseline": {
            "answer": "Yes" if majority else "No",
            "accuracy": baseline["accuracy"],
            "balanced_accuracy": baseline["balanced_accuracy"],
        },
    }


def _auroc(truth: np.ndarray, p_yes: np.ndarray, has_p: np.ndarray) -> tuple[float | None, str | None]:
    if not has_p.any():
        return None, "no p_yes in the records"
    labels = truth[has_p]
    if labels.all() or not labels.any():
        answer = "Yes" if labels.all() else "No"
        return None, f"undefined: every reference is {answer} ({labels.size} records)"
    return weighted_auroc(p_yes[has_p], labels), None


def _entry(records: list[dict], weights: np.ndarray | None) -> dict[str, Any]:
    truth = np.array([parse_closed(r["answer"]) for r in records])
    parsed = [parse_closed(r["prediction"]) for r in records]
    result = closed_metrics(truth.tolist(), parsed)
    p_yes = np.array([float(r["p_yes"]) if r.get("p_yes") is not None else math.nan for r in records])
    has_p = np.isfinite(p_yes)
    result["n_p_yes"] = int(has_p.sum())
    result["auroc"], note = _auroc(truth, p_yes, has_p)
    if note:
        result["auroc_note"] = note
    if weights is not None:
        pred = np.array([1 - t if p is None else p for t, p in zip(truth, parsed)])
        ci = rate_intervals(truth, pred, weights, CI_KEYS)
        if result["auroc"] is not None:
            ci["auroc"] = interval(auroc_rows(p_yes[has_p], truth[has_p], weights[:, has_p]))
        result["ci95"] = ci
    return result


def rate_intervals(
    truth: np.ndarray, pred: np.ndarray, weights: np.ndarray, keys: Sequence[str]
) -> dict[str, list[float] | None]:
    """Bootstrap intervals of `rates` keys, all resamples at once (weights: resamples x records)."""
    truth, pred = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    tp, fn = weights @ (truth & pred), weights @ (truth & ~pred)
    tn, fp = weights @ (~truth & ~pred), weights @ (~truth & pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
        values = {
            "sensitivity": sensitivity,
            "specificity": specificity,
            "balanced_accuracy": _mean_defined(sensitivity, specificity),
            "f1": np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
        }
    return {key: interval(values[key]) for key in keys}


def _mean_defined(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise mean of the finite ones of a and b (NaN where neither is)."""
    count = np.isfinite(a).astype(float) + np.isfinite(b)
    total = np.nan_to_num(a) + np.nan_to_num(b)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def closed_scores(records: list[dict], weights: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Per finding (sorted) and `pooled` over all: `closed_metrics` keys plus `auroc`, `n_p_yes`, and
    with bootstrap `weights` (resamples x records) `ci95` of sensitivity, specificity, balanced
    accuracy and AUROC."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[finding_of(record)].append(i)
    out = {}
    for name, index in sorted(groups.items()):
        out[name] = _entry([records[i] for i in index], None if weights is None else weights[:, index])
    out[POOLED] = _entry(records, weights)
    return out
