"""Metrics as plain-text tables (`m3d-lit score`, `m3d-lit eval`): every metric per group, the closed
findings, the open question read as findings."""

from __future__ import annotations

from typing import Any

__all__ = ["format_closed", "format_open", "format_table"]

ROWS = (
    ["n", "n_text"]
    + [f"bleu{n}" for n in range(1, 5)]
    + [f"bleu{n}_sent" for n in range(1, 5)]
    + ["rouge1", "rouge2", "rougeL", "meteor", "bertscore_f1"]
    + ["n_closed", "closed_positives", "closed_unparsed", "accuracy", "sensitivity", "specificity"]
    + ["balanced_accuracy", "f1", "majority_accuracy", "majority_balanced_accuracy", "n_seg", "dice", "iou"]
)

TEXT_ROWS = {f"bleu{n}" for n in range(1, 5)} | {f"bleu{n}_sent" for n in range(1, 5)}
TEXT_ROWS |= {"rouge1", "rouge2", "rougeL", "meteor", "bertscore_f1"}


def _cell(group: dict[str, Any], row: str) -> str:
    if row.startswith("majority_"):
        value = group.get("majority_baseline", {}).get(row.removeprefix("majority_"))
    else:
        value = group.get(row)
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table: one row per metric, one column for all samples and each dataset and kind.

    Text metrics carry the protocol's name (`bleu1 [m3d]`)."""
    columns = [("all", metrics)]
    columns += [(name, group) for name, group in metrics.get("by_dataset", {}).items()]
    columns += [(f"kind:{name}", group) for name, group in metrics.get("by_kind", {}).items()]
    width = max(12, *(len(name) + 2 for name, _ in columns))
    protocol = metrics.get("protocol")
    lines = [f"{'metric':<28}" + "".join(f"{name:>{width}}" for name, _ in columns)]
    for row in ROWS:
        cells = [_cell(group, row) for _, group in columns]
        label = f"{row} [{protocol}]" if protocol and row in TEXT_ROWS else row
        if any(cell != "-" for cell in cells):
            lines.append(f"{label:<28}" + "".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)


def _number(value: Any, ci: list[float] | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def format_closed(metrics: dict[str, Any]) -> str:
    """A plain-text table of the closed findings and the pooled row: AUROC (95% CI), sensitivity,
    specificity and balanced accuracy beside the always-majority baseline's."""
    table = metrics.get("closed", {})
    if not table:
        return ""
    head = (
        f"{'closed finding':<44}{'n':>5}{'yes':>5}{'AUROC [95% CI]':>24}{'sens':>7}{'spec':>7}{'bal acc':>9}"
    )
    lines = [head + f"{'maj bal':>9}"]
    for finding, row in table.items():
        label = finding if len(finding) <= 42 else finding[:39] + "..."
        ci = row.get("ci95", {})
        auroc = _number(row["auroc"], ci.get("auroc")) if row["auroc"] is not None else "undefined"
        lines.append(
            f"{label:<44}{row['n']:>5}{row['positives']:>5}{auroc:>24}{_number(row['sensitivity']):>7}"
            f"{_number(row['specificity']):>7}{row['balanced_accuracy']:>9.3f}"
            f"{row['majority_baseline']['balanced_accuracy']:>9.3f}"
        )
    notes = sorted(
        {f"{name}: AUROC {row['auroc_note']}" for name, row in table.items() if "auroc_note" in row}
    )
    return "\n".join(lines + notes)


def format_open(metrics: dict[str, Any]) -> str:
    """A plain-text table of the open hemorrhage question read as findings: per type, and side accuracy."""
    found = metrics.get("open_findings")
    if not found:
        return ""
    lines = [f"{'open question finding':<24}{'n':>5}{'present':>9}{'F1':>8}{'sens':>8}{'spec':>8}"]
    for key, row in found["types"].items():
        lines.append(
            f"{key:<24}{row['n']:>5}{row['positives']:>9}{_number(row['f1']):>8}"
            f"{_number(row['sensitivity']):>8}{_number(row['specificity']):>8}"
        )
    side = found["side"]
    lines.append(f"{'side accuracy':<24}{side['n']:>5}{'-':>9}{_number(side['accuracy']):>8}")
    return "\n".join(lines)
