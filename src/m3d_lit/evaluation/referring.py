"""Referring expressions (M3D-Bench tasks 5 and 6): the box a prediction gives against the reference
box (IoU, accuracy@0.5), and whether a prediction names the boxed structure."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from m3d_lit.boxes import box_iou_3d, parse_boxes, rec_metrics
from m3d_lit.data.positioning import REG_ANSWERS

__all__ = ["rec_scores", "reg_name_metrics"]

_REG_NAME = re.compile(re.escape(REG_ANSWERS[0]).replace(re.escape("{s}"), "(.+)"))


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
