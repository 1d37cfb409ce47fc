"""Scores of the M3D-Bench tasks that `compute_metrics` does not cover: retrieval ranks, multiple-choice
accuracy by question type, box IoU, naming the boxed structure, and Dice per class.

Each function takes the prediction records of one task (`prediction`, `answer`, `question`, `id`, and
`dice`/`produced_seg` for segmentation, as `generate_records` writes them) and returns plain JSON values.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from m3d_lit.boxes import box_iou_3d, parse_boxes, rec_metrics
from m3d_lit.data.positioning import REG_ANSWERS
from m3d_lit.losses.contrastive import recall_at_k

__all__ = [
    "QUESTION_TYPES",
    "choice_metrics",
    "parse_choice",
    "reg_name_metrics",
    "rec_scores",
    "retrieval_metrics",
    "seg_metrics",
]

QUESTION_TYPES = {"1": "plane", "2": "phase", "3": "organ", "4": "abnormality", "5": "position"}
RETRIEVAL_KS = (1, 5, 10)
# A letter alone or followed by punctuation ("B", "B.", "(B) liver"); "A lesion" is an article.
_LETTER = re.compile(r"^\W*([ABCD])(?:[.):,]|\s*$)")
_CHOICES = re.compile(r"Choices:\s*A\.\s*(.*?)\s+B\.\s*(.*?)\s+C\.\s*(.*?)\s+D\.\s*(.*?)\s*$", re.DOTALL)
_REG_NAME = re.compile(re.escape(REG_ANSWERS[0]).replace(re.escape("{s}"), "(.+)"))


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, pools: Sequence[int]
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Recall@1/5/10 both ways over the first `min(pool, N)` pairs, per pool size.

    Returns the metrics (`pool_<p>`: `size`, `capped`, `i2t_R@k`, `t2i_R@k`), and the 0-based rank of
    each pair's true match image->text and text->image in the largest pool used (ties count in the
    pair's favour, as in `recall_at_k`).

    Args:
        image_features: N x E, L2-normalised, row i matching text row i.
        text_features: N x E, L2-normalised.
        pools: pool sizes, e.g. (100, 1000); a pool larger than N is capped at N (and says so).
    """
    n = image_features.shape[0]
    if n < 1 or text_features.shape[0] != n:
        raise ValueError(f"need N >= 1 image and text features alike, got {n} and {text_features.shape[0]}")
    metrics: dict[str, Any] = {}
    for pool in pools:
        size = min(pool, n)
        sim = image_features[:size].float() @ text_features[:size].float().T
        metrics[f"pool_{pool}"] = {"size": size, "capped": size < pool, **recall_at_k(sim, RETRIEVAL_KS)}
    size = min(max(pools), n)
    sim = image_features[:size].float() @ text_features[:size].float().T
    diagonal = sim.diagonal()
    i2t = (sim > diagonal[:, None]).sum(1)
    t2i = (sim.T > diagonal[:, None]).sum(1)
    return metrics, i2t, t2i


def _choices(question: str) -> list[str] | None:
    match = _CHOICES.search(question)
    return None if match is None else [c.strip().rstrip(".").lower() for c in match.groups()]


def parse_choice(prediction: str, question: str) -> str | None:
    """The letter a prediction picks: a leading A-D (`B`, `B.`, `(B) liver`), else the one choice whose
    text it contains; None when neither is clear."""
    match = _LETTER.match(prediction or "")
    if match:
        return match.group(1)
    choices = _choices(question)
    text = (prediction or "").lower()
    if not choices or not text.strip():
        return None
    hits = [letter for letter, choice in zip("ABCD", choices) if choice and choice in text]
    return hits[0] if len(hits) == 1 else None


def choice_metrics(records: Sequence[Mapping[str, Any]], types: Mapping[str, str]) -> dict[str, Any]:
    """Multiple-choice accuracy overall and per question type (`types`: record id -> type number).

    The reference letter is the first character of the answer (`B. liver`); an unparsable prediction
    counts as wrong and in `unparsed`.
    """
    if not records:
        raise ValueError("choice_metrics needs at least one record")
    groups: dict[str, list[bool]] = defaultdict(list)
    hits, unparsed = [], 0
    for record in records:
        picked = parse_choice(record["prediction"], record.get("question", ""))
        unparsed += picked is None
        hit = picked is not None and picked == record["answer"].strip()[:1]
        hits.append(hit)
        number = str(types.get(record["id"], "?"))
        groups[QUESTION_TYPES.get(number, f"type {number}")].append(hit)
    by_type = {name: {"n": len(g), "accuracy": sum(g) / len(g)} for name, g in sorted(groups.items())}
    return {"n": len(hits), "accuracy": sum(hits) / len(hits), "unparsed": unparsed, "by_type": by_type}


def rec_scores(records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[float | None]]:
    """`rec_metrics` against the box written in each reference answer, and each sample's IoU."""
    references = []
    for record in records:
        boxes = parse_boxes(record["answer"])
        if not boxes:
            raise ValueError(f"record {record.get('id')!r}: the reference holds no box: {record['answer']!r}")
        references.append(boxes[0])
    metrics = rec_metrics([r["prediction"] for r in records], references)
    ious = []
    for record, ref in zip(records, references):
        boxes = parse_boxes(record["prediction"])
        ious.append(box_iou_3d(boxes[0], ref) if boxes else None)
    return metrics, ious


def reg_name_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Share of predictions that name the boxed structure (the canonical reference `It is the <s>.`)."""
    named = []
    for record in records:
        match = _REG_NAME.fullmatch(record["answer"].strip())
        if match:
            named.append(match.group(1).lower() in record["prediction"].lower())
    return {"reg_n_named": len(named), "reg_name_acc": sum(named) / len(named) if named else None}


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def seg_metrics(records: Sequence[Mapping[str, Any]], group: Any = None) -> dict[str, Any]:
    """Mean Dice over samples with a non-empty reference mask, per group (e.g. class) when `group` is given.

    Samples with an empty mask have no Dice; `negative_seg_rate` is the share of them for which the model
    still produced `[SEG]` (a mask where there is nothing).

    Args:
        records: `seg` prediction records with `dice` (positives) and `produced_seg`.
        group: record -> group name; None gives no per-group table.
    """
    positives = [r for r in records if r.get("dice") is not None]
    negatives = [r for r in records if r.get("dice") is None]
    out: dict[str, Any] = {
        "n": len(records),
        "n_positive": len(positives),
        "dice": _mean([float(r["dice"]) for r in positives]),
        "iou": _mean([float(r["iou"]) for r in positives]),
        "produced_seg_rate": _mean([float(bool(r.get("produced_seg"))) for r in positives]),
        "negative_seg_rate": _mean([float(bool(r.get("produced_seg"))) for r in negatives]),
    }
    if group is not None:
        classes: dict[str, list[float]] = defaultdict(list)
        for record in positives:
            classes[str(group(record))].append(float(record["dice"]))
        out["dice_by_class"] = {name: _mean(values) for name, values in sorted(classes.items())}
        out["dice_class_mean"] = _mean([v for v in out["dice_by_class"].values() if v is not None])
    return out
