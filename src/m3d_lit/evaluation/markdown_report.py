"""`report.md`: the evaluation for people to read.

Sections: the text metrics of the question-answer records per dataset, every text metric per group,
closed findings with AUROC (ROC curves and per-question balanced accuracy as PNGs), the open question
read as findings, segmentation Dice in its own table, a few examples with the middle axial slice, how
every metric is computed, and the works cited. Published figures stand only beside the data they were
measured on (`m3d_lit.data.sources.reference_for`): a table gets a published row or column only when one
of its datasets has such figures, and its caption names the work, where in it and what was measured.
Each table says how many records and which kinds it covers; brackets hold patient-level bootstrap 95% CIs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.atomic import atomic_path
from m3d_lit.data.sources import display_name, reference_for
from m3d_lit.data.sources.references import M3D_2024, Work
from m3d_lit.evaluation.citations import cite, references_section
from m3d_lit.evaluation.closed import POOLED
from m3d_lit.evaluation.findings_report import closed_section, open_section
from m3d_lit.evaluation.metric_definitions import metric_definitions

__all__ = ["metric_definitions", "write_report"]

TEXT_KEYS = {
    "m3d": ["bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "meteor"],
    "corpus": [f"bleu{n}" for n in range(1, 5)]
    + [f"bleu{n}_sent" for n in range(1, 5)]
    + ["rouge1", "rouge2", "rougeL", "meteor"],
}
PLOT_NAME = "closed_balanced_accuracy.png"
_PUBLISHED_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge", "meteor")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _groups(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(dataset, metrics) per dataset, or ("all", metrics) when records carry no dataset."""
    by_dataset = metrics.get("by_dataset") or {}
    return list(by_dataset.items()) or [("all", metrics)]


def _with_ci(group: dict[str, Any], key: str, ci_key: str = "ci95") -> str:
    value, ci = group.get(key), (group.get(ci_key) or {}).get(key)
    return _fmt(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if value is not None and ci else "")


def _text_row(label: str, source: str | None, group: dict[str, Any], keys: list[str]) -> str:
    """One row of our scores; `source` names it in the Source column, None when the table has none."""
    cells = [_with_ci(group, k) for k in keys] + [str(group["n_text"]), ", ".join(group["text_kinds"])]
    first = f"| {label} | {source} | " if source is not None else f"| {label} | "
    return first + " | ".join(cells) + " |"


def _table1(metrics: dict[str, Any], cited: list[Work]) -> list[str]:
    protocol = metrics.get("protocol", "m3d")
    keys_shown = TEXT_KEYS[protocol] + (["bertscore_f1"] if "bertscore_f1" in metrics else [])
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-1", "METEOR"]
    keys = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "meteor"]
    groups = _groups(metrics)
    found = {name: ref for name, _ in groups if (ref := reference_for(name, "qa")) is not None}
    source = "Source | " if found else ""
    head = f"| Dataset | {source}" + " | ".join(f"{n} ({protocol})" for n in names) + " | n records | kinds |"
    title = "beside the published figures on the same data" if found else "text metrics"
    lines = [f"## Question answering: {title}", "", head, "|" + " --- |" * (10 if found else 9)]
    for name, group in groups:
        label = display_name(name)
        if name in found:
            values = " | ".join(_fmt(found[name].values[k]) for k in _PUBLISHED_KEYS)
            lines.append(f"| {label} | published | {values} | - | open, closed |")
        if "n_text" not in group:
            continue
        lines.append(_text_row(label, "ours" if found else None, group, keys))
        if protocol == "corpus":
            sentence = [f"bleu{n}_sent" for n in range(1, 5)] + keys[4:]
            if found:
                lines.append(_text_row(label, "ours, sentence BLEU", group, sentence))
            else:
                lines.append(_text_row(f"{label} (sentence BLEU)", None, group, sentence))
    caption = (
        "ROUGE is ROUGE-1 F1, what M3D's `eval_vqa.py` reports. Brackets: patient-level bootstrap 95% CI. "
    )
    caption += "The rows cover the question-answer records only."
    lines += ["", _published_caption(metrics, found, protocol, cited) + caption, ""]
    return lines + _all_text(metrics, protocol, keys_shown)


def _published_caption(
    metrics: dict[str, Any], found: dict[str, Any], protocol: str, cited: list[Work]
) -> str:
    """What the published rows are and whose, or that this data has none."""
    if not metrics.get("by_dataset"):
        none = "No published figures belong to these records: they name no dataset. "
    else:
        bare = [display_name(name) for name in metrics["by_dataset"] if name not in found]
        none = f"No published figures were measured on {', '.join(bare)}. " if bare else ""
    if not found:
        return none
    shown = "; ".join(f"for {display_name(name)}, {cite(cited, ref)}" for name, ref in found.items())
    comparable = (
        "The `m3d` protocol scores as M3D's own evaluation code does, so the rows compare like for like "
        "(up to the METEOR tokenizer note below)."
        if protocol == "m3d"
        else "The `corpus` protocol is not how the published rows were scored (use `--protocol m3d` for "
        "that): its rows are a reference point, not a like-for-like comparison."
    )
    return f"Published rows (not our model) stand beside the data they were measured on: {shown}. {comparable} {none}"


def _all_text(metrics: dict[str, Any], protocol: str, keys_shown: list[str]) -> list[str]:
    lines = [
        f"All text metrics ({protocol} protocol), per group:",
        "",
        "| Group | " + " | ".join(f"{k} ({protocol})" for k in keys_shown) + " | n records | kinds |",
        "|" + " --- |" * (len(keys_shown) + 3),
    ]
    rows = [("all", metrics)] + list((metrics.get("by_dataset") or {}).items())
    rows += [(f"kind: {k}", g) for k, g in (metrics.get("by_kind") or {}).items()]
    for name, group in rows:
        if "n_text" in group:
            cells = [_fmt(group.get(k)) for k in keys_shown] + [
                str(group["n_text"]),
                ", ".join(group["text_kinds"]),
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _closed(metrics: dict[str, Any], records: list[dict], out_dir: Path, cited: list[Work]) -> list[str]:
    groups = [(name, g) for name, g in _groups(metrics) if "closed" in g]
    if not groups:
        return []
    labelled = [(display_name(name), name, g) for name, g in groups]
    lines = closed_section(labelled, records, out_dir, cited)
    lines += [
        "",
        "### Closed Yes/No answers beside the always-majority baseline",
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
        prefix = display_name(name)
        for question, row in group["closed"].items():
            if question != POOLED:
                lines.append(_closed_row(f"{prefix}: {question}", row["n"], row["positives"], row))
        total = f"**{prefix}: all closed**"
        lines.append(_closed_row(total, group["n_closed"], group["closed_positives"], group))
    _plot_closed(groups, out_dir / PLOT_NAME)
    lines += ["", f"![balanced accuracy per question]({PLOT_NAME})"]
    return lines


def _closed_row(label: str, n: int, positives: int, row: dict[str, Any]) -> str:
    base = row["majority_baseline"]
    cells = [n, positives, row["accuracy"], base["accuracy"]]
    cells += [row["balanced_accuracy"], base["balanced_accuracy"], row["f1"], base["answer"]]
    return f"| {label} | " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in cells) + " |"


def _plot_closed(groups: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, values = [], []
    for name, group in groups:
        for question, row in group["closed"].items():
            if question == POOLED:
                continue
            text = f"{display_name(name)}: {question}"
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _segmentation(metrics: dict[str, Any], cited: list[Work]) -> list[str]:
    groups = [(name, g) for name, g in _groups(metrics) if "dice" in g]
    if not groups:
        return []
    found = {name: ref for name, _ in groups if (ref := reference_for(name, "seg")) is not None}
    lines = [
        "## Segmentation (its own records, kept out of the text metrics)",
        "",
        "| Dataset | n records | kinds | Dice | IoU |" + (" Published Dice |" if found else ""),
        "|" + " --- |" * (6 if found else 5),
    ]
    for name, group in groups:
        dice, iou = _with_ci(group, "dice", "ci95_seg"), _with_ci(group, "iou", "ci95_seg")
        row = f"{group['n_seg']} | seg (reference mask non-empty) | {dice} | {iou}"
        published = f" | {_fmt(found[name].values['dice']) if name in found else '-'}" if found else ""
        lines.append(f"| {display_name(name)} | {row}{published} |")
    if not found:
        return lines
    shown = "; ".join(f"for {display_name(name)}, {cite(cited, ref)}" for name, ref in found.items())
    return lines + ["", f"Published Dice (not our model) stands beside the data it was measured on: {shown}."]


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
    with atomic_path(path) as tmp:
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


def _model_lines(model: dict[str, Any] | None) -> list[str]:
    """Which model the report is about: file, sha256, run, training step, m3d-lit versions, date."""
    if not model:
        return []
    trained, run_with = model.get("trained_with") or {}, model.get("run_with") or {}
    return [
        f"Model: `{model['path']}` (sha256 `{model['sha256']}`"
        + (f", run `{model['run']}`" if model.get("run") else "")
        + (f", step {model['global_step']}" if model.get("global_step") is not None else "")
        + f"); trained with m3d-lit {trained.get('version')} (commit {trained.get('commit') or 'unknown'}), "
        f"evaluated with m3d-lit {run_with.get('version')} (commit {run_with.get('commit') or 'unknown'}) "
        f"on {model.get('date')}.",
        "",
    ]


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
        out_dir: folder for report.md, closed_roc.png, closed_balanced_accuracy.png and examples/*.png.
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
    protocol = metrics.get("protocol", "m3d")
    lines = [f"# {title}", "", f"{metrics['n']} samples; text metrics under the `{protocol}` protocol.", ""]
    lines += _model_lines((metrics.get("setup") or {}).get("model"))
    groups = _groups(metrics)
    labelled = [(display_name(name), name, g) for name, g in groups]
    cited: list[Work] = []
    sections = (
        _table1(metrics, cited),
        _closed(metrics, records, out_dir, cited),
        open_section(labelled, cited),
    )
    for section in (*sections, _segmentation(metrics, cited)):
        lines += section + ([""] if section else [])
    lines += _examples(records, out_dir, images, examples)
    definitions = metric_definitions(protocol, [name for name, _ in groups])
    lines += ["## How each metric is computed", ""] + [f"- {line}" for line in definitions]
    if protocol == "m3d" and M3D_2024 not in cited:
        cited.append(M3D_2024)  # the `m3d` protocol is M3D's evaluation code
    references = references_section(cited)
    lines += [""] + references if references else []
    path = out_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
