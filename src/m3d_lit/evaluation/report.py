"""`report.md`: the evaluation in the layout of the paper's Table 1, for people to read.

Sections: text metrics per dataset beside the published values, closed Yes/No questions beside the
always-majority baseline (with a PNG of per-question balanced accuracy), segmentation Dice, a few
examples with the middle axial slice, and how every metric is computed.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.evaluation.metrics import require_wordnet

__all__ = [
    "PAPER_SEG_DICE",
    "PAPER_SOURCE",
    "PAPER_TABLE1",
    "atomic_output",
    "metric_definitions",
    "write_report",
]

PAPER_SOURCE = (
    "M3D-LaMed (LoRA) on brain-CT QA, the seed paper's Table 1, as recorded in shared/FORMATS.md "
    "('Published reference numbers')"
)
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "cq500": {
        "bleu1": 0.5405,
        "bleu2": 0.3333,
        "bleu3": 0.2571,
        "bleu4": 0.2059,
        "rouge": 0.2975,
        "meteor": 0.1878,
    },
    "physionet": {
        "bleu1": 0.3958,
        "bleu2": 0.1064,
        "bleu3": 0.0435,
        "bleu4": 0.0222,
        "rouge": 0.2574,
        "meteor": 0.2141,
    },
}
PAPER_SEG_SOURCE = "CT-ICH U-Net baseline (Hssayeni et al.), as recorded in shared/FORMATS.md"
PAPER_SEG_DICE: dict[str, float] = {"physionet": 0.31}
DATASET_NAMES = {"cq500": "CQ500", "physionet": "PhysioNet"}
TEXT_KEYS = [f"bleu{n}" for n in range(1, 5)] + [f"bleu{n}_sent" for n in range(1, 5)]
TEXT_KEYS += ["rouge1", "rouge2", "rougeL", "meteor"]
PLOT_NAME = "closed_balanced_accuracy.png"


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def metric_definitions() -> list[str]:
    """How each metric is computed, in words, with library and WordNet versions (for the report)."""
    wordnet = require_wordnet().get_version()
    return [
        "Tokens: the text lowercased, then split by nltk's `TreebankWordTokenizer` "
        f"(nltk {version('nltk')}).",
        "BLEU-n (`bleu1`..`bleu4`): corpus-level BLEU over all samples of the group, uniform weights "
        "1/n up to n-grams, no smoothing, nltk `corpus_bleu` on those tokens.",
        "Sentence BLEU-n (`bleu1_sent`..`bleu4_sent`): mean over samples of nltk `sentence_bleu`, uniform "
        "weights up to n, `SmoothingFunction().method1` (epsilon 0.1 for zero n-gram counts).",
        "ROUGE-1/2/L: mean over samples of the F1 of Google's `rouge-score` "
        f"{version('rouge-score')} (`RougeScorer(use_stemmer=True)`, its own lowercasing, "
        "alphanumeric tokenizer and Porter stemmer) on the raw prediction and reference strings.",
        f"METEOR: mean over samples of nltk `meteor_score` on the tokens, WordNet {wordnet} synonyms, "
        "nltk `PorterStemmer`, alpha 0.9, beta 3, gamma 0.5. Never falls back to exact match.",
        "Closed questions: samples whose reference starts with Yes/No (kind `closed` when given). "
        "A prediction counts as Yes/No by its first word (case, spaces and punctuation ignored); "
        "any other prediction counts as wrong. F1 takes Yes as positive (0 when there are no "
        "positives at all). Balanced accuracy = mean recall over the classes present. The majority "
        "baseline always answers the group's most frequent reference (ties: No).",
        "Segmentation: per sample, mask = sigmoid(logits) > 0.5; Dice = 2|P&T|/(|P|+|T|), "
        "IoU = |P&T|/|P or T| (both 1 when both masks are empty); the table shows means over samples.",
    ]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _groups(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(dataset, metrics) per dataset, or ("all", metrics) when records carry no dataset."""
    by_dataset = metrics.get("by_dataset") or {}
    return list(by_dataset.items()) or [("all", metrics)]


def _table1(metrics: dict[str, Any]) -> list[str]:
    head = "| Dataset | Source | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE | METEOR | n |"
    lines = ["## Open-ended answers (layout of the paper's Table 1)", "", head, "|" + " --- |" * 9]
    for name, group in _groups(metrics):
        label = DATASET_NAMES.get(name, name)
        paper = PAPER_TABLE1.get(name)
        if paper:
            values = " | ".join(
                _fmt(paper[k]) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge", "meteor")
            )
            lines.append(f"| {label} | paper | {values} | - |")
        for source, suffix in (("ours, corpus BLEU", ""), ("ours, sentence BLEU", "_sent")):
            bleus = " | ".join(_fmt(group[f"bleu{n}{suffix}"]) for n in range(1, 5))
            tail = f"{_fmt(group['rouge1'])} | {_fmt(group['meteor'])} | {group['n']}"
            lines.append(f"| {label} | {source} | {bleus} | {tail} |")
    lines += [
        "",
        f"Paper values: {PAPER_SOURCE}. ROUGE here is ROUGE-1 F1. The paper's evaluation scored one "
        "sample at a time with other tokenizers, so its numbers are a reference point, not an exact "
        "like-for-like comparison; sentence BLEU is the closer analogue of a per-sample average.",
        "",
        "All text metrics, per group:",
        "",
        "| Group | " + " | ".join(TEXT_KEYS) + " | n |",
        "|" + " --- |" * (len(TEXT_KEYS) + 2),
    ]
    rows = [("all", metrics)] + list((metrics.get("by_dataset") or {}).items())
    rows += [(f"kind: {k}", g) for k, g in (metrics.get("by_kind") or {}).items()]
    for name, group in rows:
        lines.append(
            f"| {name} | " + " | ".join(_fmt(group.get(k)) for k in TEXT_KEYS) + f" | {group['n']} |"
        )
    return lines


def _closed_row(label: str, n: int, positives: int, row: dict[str, Any]) -> str:
    base = row["majority_baseline"]
    cells = [n, positives, row["accuracy"], base["accuracy"]]
    cells += [row["balanced_accuracy"], base["balanced_accuracy"], row["f1"], base["answer"]]
    return f"| {label} | " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in cells) + " |"


def _closed(metrics: dict[str, Any], out_dir: Path) -> list[str]:
    groups = [(name, g) for name, g in _groups(metrics) if "closed_by_question" in g]
    if not groups:
        return []
    lines = [
        "## Closed Yes/No questions",
        "",
        "Accuracy alone misleads on rare findings: each score stands beside the baseline that always "
        "gives the majority answer. An answer not starting with Yes/No counts as wrong "
        f"({metrics.get('closed_unparsed', 0)} such answers of {metrics['n_closed']}).",
        "",
        "| Question | n | Yes | Accuracy | Majority accuracy | Balanced acc. | Majority bal. acc. "
        "| F1 (Yes) | Majority answer |",
        "|" + " --- |" * 9,
    ]
    for name, group in groups:
        prefix = DATASET_NAMES.get(name, name)
        for question, row in group["closed_by_question"].items():
            lines.append(_closed_row(f"{prefix}: {question}", row["n"], row["positives"], row))
        total = f"**{prefix}: all closed**"
        lines.append(_closed_row(total, group["n_closed"], group["closed_positives"], group))
    _plot_closed(groups, out_dir / PLOT_NAME)
    lines += ["", f"![balanced accuracy per question]({PLOT_NAME})"]
    return lines


def _plot_closed(groups: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, values = [], []
    for name, group in groups:
        for question, row in group["closed_by_question"].items():
            text = f"{DATASET_NAMES.get(name, name)}: {question}"
            labels.append(text if len(text) <= 60 else text[:57] + "...")
            values.append(row["balanced_accuracy"])
    fig = Figure(figsize=(8, 1.0 + 0.3 * len(labels)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = np.arange(len(labels))[::-1]
    ax.barh(positions, values, color="tab:blue")
    ax.axvline(
        0.5, color="tab:red", linestyle="--", label="majority baseline (0.5 with both classes present)"
    )
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("balanced accuracy")
    ax.set_title("Closed questions (dashed: majority baseline, 0.5 when both answers occur)", fontsize=9)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _segmentation(metrics: dict[str, Any]) -> list[str]:
    groups = [(name, g) for name, g in _groups(metrics) if "dice" in g]
    if not groups:
        return []
    lines = ["## Segmentation", "", "| Dataset | n | Dice | IoU | Published Dice |", "|" + " --- |" * 5]
    for name, group in groups:
        published = _fmt(PAPER_SEG_DICE.get(name))
        row = f"{group['n_seg']} | {_fmt(group['dice'])} | {_fmt(group['iou'])} | {published}"
        lines.append(f"| {DATASET_NAMES.get(name, name)} | {row} |")
    return lines + ["", f"Published Dice: {PAPER_SEG_SOURCE}."]


def _pick_examples(records: list[dict], count: int) -> list[dict]:
    """Round-robin over (dataset, kind) in order of appearance, so every kind of answer shows."""
    buckets: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        buckets.setdefault((str(record.get("dataset")), str(record.get("kind"))), []).append(record)
    chosen: list[dict] = []
    depth = 0
    while len(chosen) < count and any(depth < len(b) for b in buckets.values()):
        chosen += [b[depth] for b in buckets.values() if depth < len(b)][: count - len(chosen)]
        depth += 1
    return chosen


def _save_slice(volume: Any, path: Path) -> None:
    from matplotlib.image import imsave

    array = volume.detach().float().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume)
    array = np.asarray(array, dtype=np.float32)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a D x H x W (or 1 x D x H x W) volume, got shape {array.shape}")
    with atomic_output(path) as tmp:
        imsave(tmp, array[array.shape[0] // 2], cmap="gray", vmin=0.0, vmax=1.0, format="png")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def _examples(
    records: list[dict], out_dir: Path, images: Callable[[dict], Any] | None, count: int
) -> list[str]:
    chosen = _pick_examples(records, count)
    lines = ["## Examples", ""] if chosen else []
    for i, record in enumerate(chosen):
        name = re.sub(r"[^A-Za-z0-9._-]", "_", str(record.get("id", f"example{i}")))
        lines.append(f"### {name} ({record.get('dataset', '-')}, {record.get('kind', '-')})")
        volume = images(record) if images is not None else None
        if volume is not None:
            picture = f"examples/{i:02d}_{name}.png"
            _save_slice(volume, out_dir / picture)
            lines += ["", f"![middle axial slice]({picture})"]
        lines += [
            "",
            f"- Question: {_one_line(record.get('question', '-'))}",
            f"- Reference: {_one_line(record['answer'])}",
            f"- Prediction: {_one_line(record['prediction'])}",
            "",
        ]
    return lines


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    records: list[dict],
    title: str,
    images: Callable[[dict], Any] | None = None,
    examples: int = 6,
) -> Path:
    """Write `out_dir/report.md` (+ the closed-question plot and example slices); return its path.

    Args:
        out_dir: folder for report.md, closed_balanced_accuracy.png and examples/*.png.
        metrics: the dict from `compute_metrics(records)`.
        records: the scored prediction records (examples are drawn from them).
        title: the report's heading, e.g. the checkpoint and data file.
        images: given a record, returns its volume (1 x D x H x W or D x H x W, values in [0, 1],
            numpy or torch) or None; None skips the example pictures.
        examples: how many examples to show.
    """
    if examples < 0:
        raise ValueError(f"examples must be >= 0, got {examples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"{metrics['n']} samples.", ""]
    for section in (_table1(metrics), _closed(metrics, out_dir), _segmentation(metrics)):
        lines += section + ([""] if section else [])
    lines += _examples(records, out_dir, images, examples)
    lines += ["## How each metric is computed", ""] + [f"- {line}" for line in metric_definitions()]
    path = out_dir / "report.md"
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
