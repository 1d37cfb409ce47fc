"""The open hemorrhage question read as findings: which types and which side an answer names.

`parse_open` inverts `m3d_lit.data.phrasing.open_answer`: an answer names a hemorrhage type by its
adjective ("subdural"), denies any bleed with "no (intracranial) hemorrhage/bleed", and gives the side
as "on the left/right side" or "on both sides". The reference and the prediction are parsed alike, and
`open_scores` reports per-type detection (and any hemorrhage, `ICH`) F1, sensitivity and specificity,
and side accuracy over the records whose reference names a bleed and a side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3d_lit.data.phrasing import OPEN_QUESTIONS, TYPE_NAMES
from m3d_lit.data.sources import SOURCES
from m3d_lit.evaluation.bootstrap import interval, weighted_means
from m3d_lit.evaluation.closed import rate_intervals, rates

__all__ = ["OpenFindings", "open_scores", "parse_open"]

_WORD = {name: re.compile(rf"\b{name}\b") for name in TYPE_NAMES.values()}
_BLEED = re.compile(r"\b(hemorrhage|haemorrhage|bleed|bleeding)\b")
_DENIED = re.compile(r"\bno\s+(?:\w+\s+){0,2}?(hemorrhage|haemorrhage|bleed|bleeding)\b")
CI_KEYS = ("f1", "sensitivity", "specificity")
_QUESTIONS = {q for options in OPEN_QUESTIONS.values() for q in options}


@dataclass(frozen=True)
class OpenFindings:
    """What an open answer states: any hemorrhage, the types (CQ500 keys) and the side."""

    hemorrhage: bool
    types: frozenset[str]
    side: str | None  # "left", "right", "both" or None (not named)


def parse_open(text: str) -> OpenFindings:
    """The findings an answer names, by the wording rules that write the references."""
    lower = (text or "").lower()
    types = frozenset(key for key, name in TYPE_NAMES.items() if _WORD[name].search(lower))
    hemorrhage = bool(types) or (_BLEED.search(lower) is not None and _DENIED.search(lower) is None)
    left, right = re.search(r"\bleft\b", lower), re.search(r"\bright\b", lower)
    if re.search(r"\bboth sides\b|\bbilateral\b", lower) or (left and right):
        side = "both"
    else:
        side = "left" if left else "right" if right else None
    return OpenFindings(hemorrhage, types, side if hemorrhage else None)


def _is_hemorrhage_answer(record: dict) -> bool:
    """The brain-CT open hemorrhage question (by its wording or its dataset), not any open answer that
    happens to say "hemorrhage" (M3D-VQA's, say)."""
    source = SOURCES.get(str(record.get("dataset")))
    ours = record.get("question") in _QUESTIONS or (source is not None and source.hemorrhage_question)
    return record.get("kind") == "open" and ours and _BLEED.search(record["answer"].lower()) is not None


def _detection(truth: np.ndarray, pred: np.ndarray, weights: np.ndarray | None) -> dict[str, Any]:
    result = {"n": int(truth.size), "positives": int(truth.sum()), **rates(truth, pred)}
    result.pop("accuracy")
    result.pop("balanced_accuracy")
    if weights is not None:
        result["ci95"] = rate_intervals(truth, pred, weights, CI_KEYS)
    return result


def open_scores(records: list[dict], weights: np.ndarray | None = None) -> dict[str, Any] | None:
    """Per-type detection and side accuracy over the open hemorrhage records; None when there are none.

    Args:
        records: prediction records; the brain-CT open questions whose reference mentions a hemorrhage
            count (all of them: "No intracranial hemorrhage." too).
        weights: bootstrap weights (resamples x records) for `ci95`, or None.
    """
    index = [i for i, r in enumerate(records) if _is_hemorrhage_answer(r)]
    if not index:
        return None
    refs = [parse_open(records[i]["answer"]) for i in index]
    preds = [parse_open(records[i]["prediction"]) for i in index]
    w = None if weights is None else weights[:, index]
    out: dict[str, Any] = {"n": len(index), "types": {}}
    truth = np.array([r.hemorrhage for r in refs])
    out["types"]["ICH"] = _detection(truth, np.array([p.hemorrhage for p in preds]), w)
    for key in TYPE_NAMES:
        truth = np.array([key in r.types for r in refs])
        out["types"][key] = _detection(truth, np.array([key in p.types for p in preds]), w)
    sided = [j for j, r in enumerate(refs) if r.side is not None]
    out["side"] = {"n": len(sided), "accuracy": None}
    if sided:
        hits = np.array([preds[j].side == refs[j].side for j in sided], dtype=np.float64)
        out["side"]["accuracy"] = float(hits.mean())
        if w is not None:
            out["side"]["ci95"] = {"accuracy": interval(weighted_means(w[:, sided], hits))}
    return out
