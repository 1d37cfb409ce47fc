"""`m3d-lit score PREDICTIONS.jsonl [--out metrics.json]`: score any model's answers offline.

Each line of the file is one JSON object with at least `prediction` and `answer` (strings), and
optionally `kind`, `question`, `dataset`, and per-sample `dice`/`iou` for segmentation samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from m3d_lit.arguments import CommandParser
from m3d_lit.errors import InputError
from m3d_lit.evaluation.metrics import compute_metrics
from m3d_lit.evaluation.report import atomic_output

__all__ = ["format_closed", "format_table", "main", "read_predictions", "write_json"]

ROWS = (
    ["n"]
    + [f"bleu{n}" for n in range(1, 5)]
    + [f"bleu{n}_sent" for n in range(1, 5)]
    + ["rouge1", "rouge2", "rougeL", "meteor"]
    + ["n_closed", "closed_positives", "closed_unparsed", "accuracy", "balanced_accuracy", "f1"]
    + ["majority_accuracy", "majority_balanced_accuracy", "n_seg", "dice", "iou"]
)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions .jsonl; a bad line raises `InputError` naming file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read it as UTF-8 text ({err})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(path, f"line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
        problem = _problem(record)
        if problem:
            raise InputError(path, f"line {number}: {problem}")
        records.append(record)
    if not records:
        raise InputError(path, "holds no predictions (every line is empty)")
    return records


def _problem(record: Any) -> str | None:
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
    return None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then `os.replace`); NaN is refused."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    with atomic_output(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _cell(group: dict[str, Any], row: str) -> str:
    if row.startswith("majority_"):
        value = group.get("majority_baseline", {}).get(row.removeprefix("majority_"))
    else:
        value = group.get(row)
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table: one row per metric, one column for all samples and each dataset and kind."""
    columns = [("all", metrics)]
    columns += [(name, group) for name, group in metrics.get("by_dataset", {}).items()]
    columns += [(f"kind:{name}", group) for name, group in metrics.get("by_kind", {}).items()]
    width = max(12, *(len(name) + 2 for name, _ in columns))
    lines = [f"{'metric':<28}" + "".join(f"{name:>{width}}" for name, _ in columns)]
    for row in ROWS:
        cells = [_cell(group, row) for _, group in columns]
        if any(cell != "-" for cell in cells):
            lines.append(f"{row:<28}" + "".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)


def format_closed(metrics: dict[str, Any]) -> str:
    """A plain-text table of the closed Yes/No questions, each beside its always-majority baseline."""
    table = metrics.get("closed_by_question", {})
    if not table:
        return ""
    head = f"{'closed question':<60}{'n':>6}{'yes':>6}{'acc':>8}{'maj acc':>9}{'bal acc':>9}{'f1':>8}"
    lines = [head]
    for question, row in table.items():
        label = question if len(question) <= 58 else question[:55] + "..."
        lines.append(
            f"{label:<60}{row['n']:>6}{row['positives']:>6}{row['accuracy']:>8.4f}"
            f"{row['majority_baseline']['accuracy']:>9.4f}{row['balanced_accuracy']:>9.4f}{row['f1']:>8.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Score a predictions file, print the table, optionally write metrics.json."""
    parser = CommandParser(
        prog="m3d-lit score",
        description="Score a predictions .jsonl (BLEU-1..4, ROUGE, METEOR, closed Yes/No, Dice/IoU) offline.",
    )
    parser.add_argument("predictions", type=Path, help="jsonl: one object per line with prediction, answer")
    parser.add_argument("--out", type=Path, default=None, help="write all metrics to this JSON file")
    args = parser.parse_args(argv)
    metrics = compute_metrics(read_predictions(args.predictions))
    print(f"{args.predictions}: {metrics['n']} samples")
    print(format_table(metrics))
    closed = format_closed(metrics)
    if closed:
        print(f"\n{closed}")
    if args.out is not None:
        write_json(args.out, metrics)
        print(f"wrote {args.out}")
    return 0
