"""The prediction record, one line of `predictions.jsonl` (`eval`, `bench`, `predict`): its schema, checked
in one place, and reading a file of them.

A record needs `prediction` and `answer` strings; optional `kind`, `question`, `finding`, `dataset`,
`patient`, `p_yes` (a number in [0, 1]) and per-sample `dice`/`iou` (both or neither, finite numbers).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from m3d_lit.errors import InputError
from m3d_lit.jsonl import read_jsonl

__all__ = ["check_records", "read_predictions", "record_problem"]


def record_problem(record: Any) -> str | None:
    """What is wrong with a prediction record, or None when it fits the schema."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in ("prediction", "answer"):
        if not isinstance(record.get(key), str):
            return f"needs a string {key!r}, got {record.get(key)!r}"
    if (record.get("dice") is None) != (record.get("iou") is None):
        return "has only one of 'dice' and 'iou'"
    for key in ("dice", "iou"):
        value = record.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            return f"{key!r} must be a finite number, got {value!r}"
    p_yes = record.get("p_yes")
    if p_yes is not None and (
        isinstance(p_yes, bool) or not isinstance(p_yes, (int, float)) or not 0.0 <= p_yes <= 1.0
    ):
        return f"'p_yes' must be a number in [0, 1], got {p_yes!r}"
    return None


def check_records(records: list[Any]) -> None:
    """Raise `ValueError` naming the first record that does not fit the schema (or an empty list)."""
    if not records:
        raise ValueError("scoring needs at least one record, got none")
    for i, record in enumerate(records):
        problem = record_problem(record)
        if problem:
            raise ValueError(f"record {i} {problem}")


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions .jsonl; a bad line raises `InputError` naming file and line."""
    records = []
    for number, record in read_jsonl(path):
        problem = record_problem(record)
        if problem:
            raise InputError(path, f"line {number}: {problem}")
        records.append(record)
    if not records:
        raise InputError(path, "holds no predictions (every line is empty)")
    return records
