"""report.md's clinical sections: closed findings beside Chilamkurthy et al. 2018, ROC curves, and the
open question read as findings."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.atomic import atomic_path
from m3d_lit.data import phrasing
from m3d_lit.evaluation.closed import POOLED, finding_of, parse_closed

__all__ = ["CHILAMKURTHY_AUROC", "CHILAMKURTHY_SOURCE", "ROC_NAME", "closed_section", "open_section"]

# AUROCs of the deep-learning algorithms on the CQ500 dataset, reported in the study that released CQ500.
CHILAMKURTHY_SOURCE = (
    "Chilamkurthy S, et al. Deep learning algorithms for detection of critical findings in head CT "
    "scans: a retrospective study. Lancet 2018;392:2388-96 (AUROCs on CQ500, rounded to two places)"
)
CHILAMKURTHY_AUROC = {
    "ICH": 0.94,
    "IPH": 0.95,
    "IVH": 0.93,
    "SDH": 0.95,
    "EDH": 0.97,
    "SAH": 0.96,
    "CalvarialFracture": 0.96,
    "MidlineShift": 0.97,
    "MassEffect": 0.92,
}
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


def _closed_row(name: str, finding: str, row: dict[str, Any]) -> str:
    ci = row.get("ci95") or {}
    auroc = _num(row["auroc"], ci.get("auroc")) if row["auroc"] is not None else f"({row['auroc_note']})"
    published = None if finding == POOLED else CHILAMKURTHY_AUROC.get(_key(finding))
    base = row["majority_baseline"]
    cells = [
        str(row["n"]),
        str(row["positives"]),
        auroc,
        "-" if published is None else f"{published:.2f}",
        _num(row["sensitivity"], ci.get("sensitivity")),
        _num(row["specificity"], ci.get("specificity")),
        _num(row["balanced_accuracy"], ci.get("balanced_accuracy")),
        f"{base['balanced_accuracy']:.3f} ({base['answer']})",
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def closed_section(
    groups: list[tuple[str, str, dict[str, Any]]], records: list[dict], out_dir: Path
) -> list[str]:
    """The per-finding table of each group (label, dataset key, metrics) and the ROC picture."""
    groups = [(label, key, g) for label, key, g in groups if g.get("closed")]
    if not groups:
        return []
    lines = [
        "## Closed findings: AUROC, sensitivity, specificity",
        "",
        "Records: the closed Yes/No questions (kind `closed`), n per finding and pooled. AUROC ranks the answers by `p_yes`, the model's probability of Yes (see the definitions); "
        "sensitivity and specificity take the answer's first word (an unparsable answer counts as wrong). "
        "Brackets: patient-level bootstrap 95% CI. The published column is not our model: it is "
        f"{CHILAMKURTHY_SOURCE}.",
        "",
        "| Finding | n | Yes | AUROC [95% CI] | Published AUROC | Sensitivity | Specificity "
        "| Balanced acc. | Majority bal. acc. (answer) |",
        "|" + " --- |" * 9,
    ]
    for label, _, group in groups:
        for finding, row in group["closed"].items():
            name = f"**{label}: pooled**" if finding == POOLED else f"{label}: {finding}"
            lines.append(_closed_row(name, finding, row))
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


def open_section(groups: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """Per-type detection and side accuracy of the open hemorrhage question, per group."""
    groups = [(label, key, g) for label, key, g in groups if g.get("open_findings")]
    if not groups:
        return []
    lines = [
        "## Open question read as findings",
        "",
        "Records: the open hemorrhage questions (kind `open`), n per row. The types and side each answer names, read by the wording rules that wrote the references "
        "(`m3d_lit.evaluation.open_findings`); ICH = any hemorrhage. Brackets: patient-level bootstrap 95% "
        "CI. The published AUROC (Chilamkurthy et al. 2018, as above) scores a classifier's probability, "
        "not a parsed answer: a reference point only.",
        "",
        "| Finding | n | Present | F1 | Sensitivity | Specificity | Published AUROC |",
        "|" + " --- |" * 7,
    ]
    for label, _, group in groups:
        found = group["open_findings"]
        for key, row in found["types"].items():
            ci = row.get("ci95") or {}
            published = CHILAMKURTHY_AUROC.get(key)
            cells = [str(row["n"]), str(row["positives"]), _num(row["f1"], ci.get("f1"))]
            cells += [
                _num(row["sensitivity"], ci.get("sensitivity")),
                _num(row["specificity"], ci.get("specificity")),
            ]
            cells.append("-" if published is None else f"{published:.2f}")
            lines.append(f"| {label}: {key} | " + " | ".join(cells) + " |")
        side = found["side"]
        accuracy = _num(side["accuracy"], (side.get("ci95") or {}).get("accuracy"))
        lines.append(
            f"| {label}: side (where the reference names one) | {side['n']} | - | accuracy {accuracy} | - | - | - |"
        )
    return lines
