"""Patient-level bootstrap: 95% confidence intervals for scores of test sets of 40-100 patients.

A resample draws the group's patients with replacement (as many as there are) and keeps every record
of each drawn patient, as often as it was drawn, so records of one scan (its six questions) stay
together. Every score of a group is computed on the same resamples, from a (resamples x records)
matrix of record weights; the interval is the 2.5th and 97.5th percentile (numpy's linear
interpolation) over the resamples where the score is defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "RESAMPLES",
    "SEED",
    "interval",
    "patient_of",
    "patient_weights",
    "weighted_auroc",
    "weighted_means",
]

RESAMPLES = 1000
SEED = 0


def patient_of(record: dict, index: int) -> str:
    """The patient of the `index`-th record: its `patient` field, else the scan of a `<scan>:<question>`
    id, else its `id`, else its position (each such record is then its own patient)."""
    if record.get("patient") is not None:
        return str(record["patient"])
    rid = record.get("id")
    if rid is None:
        return f"<record {index}>"
    return str(rid).rsplit(":", 1)[0]


def patient_weights(patients: Sequence[str], resamples: int, seed: int) -> np.ndarray:
    """(resamples x records) float64 weights: how often each record's patient was drawn."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    names, inverse = np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(names), size=(resamples, len(names)))
    counts = np.zeros((resamples, len(names)))
    np.add.at(counts, (np.arange(resamples)[:, None], drawn), 1.0)
    return counts[:, inverse]


def interval(values: np.ndarray) -> list[float] | None:
    """[2.5th, 97.5th] percentile of the finite values; None when fewer than half are defined."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.size * 2 < values.size:
        return None
    low, high = np.percentile(finite, [2.5, 97.5])
    return [float(low), float(high)]


def weighted_means(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The mean of `values` under each row of `weights`; NaN where a row drew none of these records."""
    totals = weights.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, weights @ values / totals, np.nan)


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (ties count half), records weighted; NaN when a class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.ones((1, scores.size)) if weights is None else np.asarray(weights, dtype=np.float64)[None]
    return float(auroc_rows(scores, labels, rows)[0])


def auroc_rows(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`weighted_auroc` under each row of `weights` (resamples x records), all rows at once.

    The Mann-Whitney form: the weighted share of (positive, negative) pairs in which the positive
    scores higher, from the negatives' cumulative weight below each distinct score.
    """
    labels = np.asarray(labels).astype(bool)
    unique, inverse = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    onehot = np.zeros((labels.size, unique.size))
    onehot[np.arange(labels.size), inverse] = 1.0
    neg_at = (weights * ~labels) @ onehot
    credit = (np.cumsum(neg_at, axis=1) - 0.5 * neg_at)[:, inverse]
    pos_total, neg_total = weights[:, labels].sum(1), weights[:, ~labels].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = (weights * labels * credit).sum(1) / (pos_total * neg_total)
    return np.where((pos_total > 0) & (neg_total > 0), value, np.nan)
