"""report.md's clinical sections: closed findings (beside published AUROCs measured on the same data), ROC
curves, and the open question read as findings."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.atomic import atomic_path
from m3d_lit.data import phrasing
from m3d_lit.data.sources import Reference, reference_for
from m3d_lit.data.sources.references import Work
from m3d_lit.evaluation.citations import cite
from m3d_lit.evaluation.closed import POOLED, finding_of, parse_closed

__all__ = ["ROC_NAME", "closed_section", "open_section"]

ROC_NAME = "closed_roc.png"
_CANONICAL = {phrasing.closed_question(key): key for key in phrasing.CLOSED_FINDINGS}


def _key(finding: str) -> str:
    """The CQ500 key of a finding named by key or by its canonical question."""
    return _CANONICAL.get(finding, finding)


def _num(value: Any, ci: list[float] | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}"
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


def _published(reference: Reference | None, finding: str) -> str:
    value = None if reference is None or finding == POOLED else reference.values.get(_key(finding))
    return "-" if value is None else f"{value:.2f}"


def _references(
    groups: list[tuple[str, str, dict[str, Any]]], cited: list[Work]
) -> tuple[dict[str, Reference], str]:
    """Each group's published AUROCs (only those measured on its own data) and the caption citing them."""
    found = {key: ref for _, key, _ in groups if (ref := reference_for(key, "finding")) is not None}
    if not found:
        return found, ""
    shown = "; ".join(f"for {label}, {cite(cited, found[key])}" for label, key, _ in groups if key in found)
    bare = [label for label, key, _ in groups if key not in found]
    caption = f"Published AUROC (not our model) stands beside the data it was measured on: {shown}; '-' "
    caption += "where none was published for that finding"
    return found, caption + (f" or data ({', '.join(bare)})." if bare else ".")


def _closed_row(name: str, finding: str, row: dict[str, Any], published: str | None) -> str:
    ci = row.get("ci95") or {}
    auroc = _num(row["auroc"], ci.get("auroc")) if row["auroc"] is not None else f"({row['auroc_note']})"
    base = row["majority_baseline"]
    cells = [str(row["n"]), str(row["positives"]), auroc] + ([published] if published is not None else [])
    cells += [
        _num(row["sensitivity"], ci.get("sensitivity")),
        _num(row["specificity"], ci.get("specificity")),
        _num(row["balanced_accuracy"], ci.get("balanced_accuracy")),
        f"{base['balanced_accuracy']:.3f} ({base['answer']})",
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def closed_section(
    groups: list[tuple[str, str, dict[str, Any]]], records: list[dict], out_dir: Path, cited: list[Work]
) -> list[str]:
    """The per-finding table of each group (label, dataset key, metrics) and the ROC picture.

    Args:
        groups: (label, dataset key, metrics) per group.
        records: the scored records (the ROC curves).
        out_dir: where closed_roc.png goes.
        cited: the works the report cites so far; those cited here join it.
    """
    groups = [(label, key, g) for label, key, g in groups if g.get("closed")]
    if not groups:
        return []
    found, caption = _references(groups, cited)
    published = " Published AUROC |" if found else ""
    lines = [
        "## Closed findings: AUROC, sensitivity, specificity",
        "",
        "Records: the closed Yes/No questions (kind `closed`), n per finding and pooled. AUROC ranks the "
        "answers by `p_yes`, the model's probability of Yes (see the definitions); sensitivity and "
        "specificity take the answer's first word (an unparsable answer counts as wrong). Brackets: "
        "patient-level bootstrap 95% CI." + (f" {caption}" if caption else ""),
        "",
        f"| Finding | n | Yes | AUROC [95% CI] |{published} Sensitivity | Specificity "
        "| Balanced acc. | Majority bal. acc. (answer) |",
        "|" + " --- |" * (9 if found else 8),
    ]
    for label, key, group in groups:
        for finding, row in group["closed"].items():
            name = f"**{label}: pooled**" if finding == POOLED else f"{label}: {finding}"
            lines.append(
                _closed_row(name, finding, row, _published(found.get(key), finding) if found else None)
            )
    if _plot_roc(groups, records, out_dir / ROC_NAME):
        lines += ["", f"![ROC curve per closed finding]({ROC_NAME})"]
    return lines


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order].astype(bool)
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tps, fps = np.cumsum(labels)[last], np.cumsum(~labels)[last]
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def _curves(groups: list[tuple[str, str, dict[str, Any]]], records: list[dict]) -> list[tuple[str, Any, Any]]:
    by_finding: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        if record.get("p_yes") is not None and parse_closed(record["answer"]) is not None:
            by_finding[(str(record.get("dataset")), finding_of(record))].append(record)
    curves = []
    for label, key, group in groups:
        for finding, row in group["closed"].items():
            chosen = (
                by_finding.get((key, finding), [])
                if key != "all"
                else [r for (_, f), rs in by_finding.items() if f == finding for r in rs]
            )
            if finding == POOLED or row["auroc"] is None or not chosen:
                continue
            scores = np.array([float(r["p_yes"]) for r in chosen])
            labels = np.array([parse_closed(r["answer"]) for r in chosen])
            fpr, tpr = roc_points(scores, labels)
            curves.append((f"{label}: {finding} (AUROC {row['auroc']:.3f})", fpr, tpr))
    return curves


def _plot_roc(groups: list[tuple[str, str, dict[str, Any]]], records: list[dict], path: Path) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = _curves(groups, records)
    if not curves:
        return False
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, fpr, tpr in curves:
        # straight segments between thresholds: tied scores count half, as in the AUROC
        ax.plot(fpr, tpr, label=label if len(label) <= 70 else label[:67] + "...")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity")
    ax.set_title("Closed findings: ROC from p_yes", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return True


def open_section(groups: list[tuple[str, str, dict[str, Any]]], cited: list[Work]) -> list[str]:
    """Per-type detection and side accuracy of the open hemorrhage question, per group.

    Args:
        groups: (label, dataset key, metrics) per group.
        cited: the works the report cites so far; those cited here join it.
    """
    groups = [(label, key, g) for label, key, g in groups if g.get("open_findings")]
    if not groups:
        return []
    found, caption = _references(groups, cited)
    note = (
        f" {caption} It scores a classifier's probability, not a parsed answer: a reference point only."
        if found
        else ""
    )
    lines = [
        "## Open question read as findings",
        "",
        "Records: the open hemorrhage questions (kind `open`), n per row. The types and side each answer "
        "names, read by the wording rules that wrote the references (`m3d_lit.evaluation.open_findings`); "
        "ICH = any hemorrhage. Brackets: patient-level bootstrap 95% CI." + note,
        "",
        "| Finding | n | Present | F1 | Sensitivity | Specificity |"
        + (" Published AUROC |" if found else ""),
        "|" + " --- |" * (7 if found else 6),
    ]
    for label, key, group in groups:
        found_types = group["open_findings"]
        for finding, row in found_types["types"].items():
            ci = row.get("ci95") or {}
            cells = [str(row["n"]), str(row["positives"]), _num(row["f1"], ci.get("f1"))]
            cells += [
                _num(row["sensitivity"], ci.get("sensitivity")),
                _num(row["specificity"], ci.get("specificity")),
            ]
            cells += [_published(found.get(key), finding)] if found else []
            lines.append(f"| {label}: {finding} | " + " | ".join(cells) + " |")
        side = found_types["side"]
        accuracy = _num(side["accuracy"], (side.get("ci95") or {}).get("accuracy"))
        empty = " - | - |" + (" - |" if found else "")
        lines.append(
            f"| {label}: side (where the reference names one) | {side['n']} | - | accuracy {accuracy} |{empty}"
        )
    return lines
