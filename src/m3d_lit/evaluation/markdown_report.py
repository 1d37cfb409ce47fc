"""`report.md`: the evaluation in the layout of the paper's Table 1, for people to read.

Sections: the Table 1 rows (question-answer records only) per dataset beside the published values,
every text metric per group, closed findings with AUROC beside Chilamkurthy et al. 2018 (ROC curves and
per-question balanced accuracy as PNGs), the open question read as findings, segmentation Dice in its
own table, a few examples with the middle axial slice, and how every metric is computed. Each table
says how many records and which kinds it covers; brackets hold patient-level bootstrap 95% CIs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.atomic import atomic_path
from m3d_lit.data.sources import SOURCES, display_name
from m3d_lit.evaluation.closed import POOLED
from m3d_lit.evaluation.findings_report import closed_section, open_section
from m3d_lit.evaluation.wordnet import require_wordnet

__all__ = [
    "PAPER_SEG_DICE",
    "PAPER_SOURCE",
    "PAPER_TABLE1",
    "metric_definitions",
    "write_report",
]

PAPER_SOURCE = (
    "M3D-LaMed (LoRA) on brain-CT QA, the seed paper's Table 1, as recorded in shared/FORMATS.md "
    "('Published reference numbers')"
)
PAPER_TABLE1: dict[str, dict[str, float]] = {
    name: dict(source.paper_table1) for name, source in SOURCES.items() if source.paper_table1
}
PAPER_SEG_SOURCE = "CT-ICH U-Net baseline (Hssayeni et al.), as recorded in shared/FORMATS.md"
PAPER_SEG_DICE: dict[str, float] = {
    name: source.paper_seg_dice for name, source in SOURCES.items() if source.paper_seg_dice is not None
}
TEXT_KEYS = {
    "m3d": ["bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "meteor"],
    "corpus": [f"bleu{n}" for n in range(1, 5)]
    + [f"bleu{n}_sent" for n in range(1, 5)]
    + ["rouge1", "rouge2", "rougeL", "meteor"],
}
PLOT_NAME = "closed_balanced_accuracy.png"
_TABLE1_RECORDS = ", ".join(s.table1_records for s in SOURCES.values() if s.table1_records)


def metric_definitions(protocol: str = "m3d") -> list[str]:
    """How each metric is computed, in words, with library and WordNet versions (for the report)."""
    lines = [f"Text metrics follow the `{protocol}` protocol (`--protocol`); each name says so."]
    return lines + _text_definitions(protocol, require_wordnet().get_version()) + _other_definitions()


def _text_definitions(protocol: str, wordnet: str) -> list[str]:
    if protocol == "m3d":
        return [
            "`m3d` is M3D's own `Bench/eval/eval_vqa.py`: each sample scored alone (texts stripped), then the "
            "mean over samples.",
            "BLEU-n (m3d): Hugging Face `evaluate`'s `bleu` with `max_order=n`: sacrebleu "
            f"{version('sacrebleu')}'s 13a tokens (case kept), modified n-gram precision of orders 1..n, "
            "uniform weights, no smoothing (0 when an order has no match), brevity penalty exp(1 - r/c) "
            "when c < r; an empty prediction or reference scores 0 (where `evaluate` divides by zero).",
            f"ROUGE-1 and ROUGE-L (m3d): F-measure of `rouge-score` {version('rouge-score')} without "
            "stemming (its lowercasing, alphanumeric tokens).",
            f"METEOR (m3d): nltk {version('nltk')} `single_meteor_score`, alpha 0.9, beta 3, gamma 0.5, "
            f"Porter stemmer, WordNet {wordnet}, on `word_tokenize`'s two steps with an untrained Punkt "
            "sentence splitter (nltk's English model is not installable offline); the same tokens for every "
            "text with at most one sentence-final mark.",
            "BERTScore F1 (m3d, only with `--bertscore-model DIR`): `bert_score`'s greedy cosine matching of "
            "the local model's layer-L token vectors (no idf, no rescaling; L = 17 for roberta-large, "
            "`evaluate`'s English default, else the last layer or `--bertscore-layer`).",
        ]
    return [
        "Tokens: the text lowercased, then split by nltk's `TreebankWordTokenizer` "
        f"(nltk {version('nltk')}).",
        "BLEU-n (corpus) (`bleu1`..`bleu4`): corpus-level BLEU over all samples of the group, uniform "
        "weights 1/n up to n-grams, no smoothing, nltk `corpus_bleu` on those tokens.",
        "Sentence BLEU-n (corpus) (`bleu1_sent`..`bleu4_sent`): mean over samples of nltk `sentence_bleu`, "
        "uniform weights up to n, `SmoothingFunction().method1` (epsilon 0.1 for zero n-gram counts).",
        "ROUGE-1/2/L (corpus): mean over samples of the F1 of Google's `rouge-score` "
        f"{version('rouge-score')} (`RougeScorer(use_stemmer=True)`, its own lowercasing, "
        "alphanumeric tokenizer and Porter stemmer) on the raw prediction and reference strings.",
        f"METEOR (corpus): mean over samples of nltk `meteor_score` on the tokens, WordNet {wordnet} "
        "synonyms, nltk `PorterStemmer`, alpha 0.9, beta 3, gamma 0.5. Never falls back to exact match.",
    ]


def _other_definitions() -> list[str]:
    return [
        f"Table 1 rows cover the question-answer records only ({_TABLE1_RECORDS}); segmentation "
        "and box samples are scored in their own tables.",
        "Closed questions: samples whose reference starts with Yes/No (kind `closed` when given). "
        "A prediction counts as Yes/No by its first word (case, spaces and punctuation ignored); "
        "any other prediction counts as wrong. Yes is positive: sensitivity, specificity, F1 (0 when "
        "there are no positives at all); balanced accuracy = mean recall over the classes present. The "
        "majority baseline always answers the group's most frequent reference (ties: No). AUROC ranks "
        "`p_yes` (ties count half); with a single class it is undefined and reported as such.",
        "`p_yes` (from `m3d-lit eval`): softmax over the two logits of the answer's first token, `Yes` "
        "against `No`, at the first generated position (the same forward pass as the greedy answer).",
        "Confidence intervals: 2.5th-97.5th percentile over bootstrap resamples of patients (all records "
        "of a drawn patient, as often as drawn), seeded; `metrics.json` `bootstrap` gives the count and seed.",
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


def _with_ci(group: dict[str, Any], key: str, ci_key: str = "ci95") -> str:
    value, ci = group.get(key), (group.get(ci_key) or {}).get(key)
    return _fmt(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if value is not None and ci else "")


def _text_row(label: str, source: str, group: dict[str, Any], keys: list[str]) -> str:
    cells = [_with_ci(group, k) for k in keys] + [str(group["n_text"]), ", ".join(group["text_kinds"])]
    return f"| {label} | {source} | " + " | ".join(cells) + " |"


def _table1(metrics: dict[str, Any]) -> list[str]:
    protocol = metrics.get("protocol", "m3d")
    keys_shown = TEXT_KEYS[protocol] + (["bertscore_f1"] if "bertscore_f1" in metrics else [])
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-1", "METEOR"]
    keys = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "meteor"]
    head = "| Dataset | Source | " + " | ".join(f"{n} ({protocol})" for n in names) + " | n records | kinds |"
    lines = ["## Question answering: the rows of the paper's Table 1", "", head, "|" + " --- |" * 10]
    for name, group in _groups(metrics):
        label = display_name(name)
        paper = PAPER_TABLE1.get(name)
        if paper:
            values = " | ".join(
                _fmt(paper[k]) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge", "meteor")
            )
            lines.append(f"| {label} | paper | {values} | - | open, closed |")
        if "n_text" not in group:
            continue
        lines.append(_text_row(label, "ours", group, keys))
        if protocol == "corpus":
            lines.append(
                _text_row(
                    label, "ours, sentence BLEU", group, [f"bleu{n}_sent" for n in range(1, 5)] + keys[4:]
                )
            )
    comparable = (
        "the `m3d` protocol scores as the paper's evaluation code does, so the rows compare like for like "
        "(up to the METEOR tokenizer note below)"
        if protocol == "m3d"
        else "the `corpus` protocol is not how the paper scored (use `--protocol m3d` for that): its rows are "
        "a reference point, not a like-for-like comparison"
    )
    lines += [
        "",
        f"Paper values: {PAPER_SOURCE}. ROUGE is ROUGE-1 F1, what M3D's `eval_vqa.py` reports; {comparable}. "
        "Brackets: patient-level bootstrap 95% CI. The rows cover the question-answer records only.",
        "",
    ]
    return lines + _all_text(metrics, protocol, keys_shown)


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


def _closed(metrics: dict[str, Any], records: list[dict], out_dir: Path) -> list[str]:
    groups = [(name, g) for name, g in _groups(metrics) if "closed" in g]
    if not groups:
        return []
    labelled = [(display_name(name), name, g) for name, g in groups]
    lines = closed_section(labelled, records, out_dir)
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


def _segmentation(metrics: dict[str, Any]) -> list[str]:
    groups = [(name, g) for name, g in _groups(metrics) if "dice" in g]
    if not groups:
        return []
    lines = [
        "## Segmentation (its own records, kept out of the text metrics)",
        "",
        "| Dataset | n records | kinds | Dice | IoU | Published Dice |",
        "|" + " --- |" * 6,
    ]
    for name, group in groups:
        published = _fmt(PAPER_SEG_DICE.get(name))
        dice, iou = _with_ci(group, "dice", "ci95_seg"), _with_ci(group, "iou", "ci95_seg")
        row = f"{group['n_seg']} | seg (reference mask non-empty) | {dice} | {iou} | {published}"
        lines.append(f"| {display_name(name)} | {row} |")
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
    labelled = [(display_name(name), name, g) for name, g in _groups(metrics)]
    sections = (_table1(metrics), _closed(metrics, records, out_dir), open_section(labelled))
    for section in (*sections, _segmentation(metrics)):
        lines += section + ([""] if section else [])
    lines += _examples(records, out_dir, images, examples)
    lines += ["## How each metric is computed", ""] + [f"- {line}" for line in metric_definitions(protocol)]
    path = out_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
