"""`m3d-lit score PREDICTIONS.jsonl [--protocol m3d|corpus] [--out metrics.json]`: score answers offline.

Each line of the file is one JSON object with at least `prediction` and `answer` (strings), and
optionally `kind`, `question`, `finding`, `dataset`, `patient`, `p_yes` (closed answers: the model's
probability of Yes, a number in [0, 1]) and per-sample `dice`/`iou` for segmentation samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from m3d_lit.atomic import write_json
from m3d_lit.commands.arguments import CommandParser
from m3d_lit.evaluation.bootstrap import RESAMPLES, SEED
from m3d_lit.evaluation.grouped_scores import PROTOCOLS, compute_metrics
from m3d_lit.evaluation.predictions import read_predictions
from m3d_lit.evaluation.tables import format_closed, format_open, format_table

__all__ = ["add_protocol_options", "format_scores", "main", "protocol_options"]


def add_protocol_options(parser: argparse.ArgumentParser) -> None:
    """`--protocol`, `--bootstrap` and `--seed`, shared by `score`, `eval` and `bench`."""
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="m3d",
        help="text metrics: m3d (per sample, as M3D's eval_vqa.py; default) or corpus (corpus BLEU, "
        "sentence BLEU, stemmed ROUGE)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=RESAMPLES,
        help="patient-level bootstrap resamples for 95%% CIs (0: none)",
    )
    parser.add_argument("--seed", type=int, default=SEED, help="the bootstrap's seed")
    parser.add_argument(
        "--bertscore-model",
        type=Path,
        default=None,
        help="m3d protocol: a local model directory (roberta-large for M3D's setting) to add BERTScore F1 "
        "(default: no BERTScore)",
    )
    parser.add_argument(
        "--bertscore-layer",
        type=int,
        default=None,
        help="its hidden layer (default 17 for roberta-large, else the last)",
    )


def protocol_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The `compute_metrics` keywords of the options `add_protocol_options` adds, checked."""
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.bertscore_model is not None and args.protocol != "m3d":
        parser.error("--bertscore-model belongs to --protocol m3d")
    return {
        "resamples": args.bootstrap,
        "seed": args.seed,
        "bertscore_model": None if args.bertscore_model is None else str(args.bertscore_model),
        "bertscore_layer": args.bertscore_layer,
    }


def format_scores(title: str, metrics: dict[str, Any]) -> str:
    """What `score` and `eval` print: the samples and protocol, the text metrics table, then the closed
    and open questions' tables where there are such questions."""
    tables = [f"{title}: {metrics['n']} samples, protocol {metrics['protocol']}\n{format_table(metrics)}"]
    tables += [table for table in (format_closed(metrics), format_open(metrics)) if table]
    return "\n\n".join(tables)


def main(argv: list[str]) -> int:
    """Score a predictions file, print the table, optionally write metrics.json."""
    parser = CommandParser(
        prog="m3d-lit score",
        description="Score a predictions .jsonl (BLEU-1..4, ROUGE, METEOR, closed Yes/No with AUROC, open "
        "findings, Dice/IoU) offline.",
    )
    parser.add_argument("predictions", type=Path, help="jsonl: one object per line with prediction, answer")
    parser.add_argument(
        "--out", type=Path, default=None, help="write all metrics to this JSON file (default: the table only)"
    )
    add_protocol_options(parser)
    args = parser.parse_args(argv)
    options = protocol_options(parser, args)
    records = read_predictions(args.predictions)
    metrics = compute_metrics(records, args.protocol, **options)
    print(format_scores(str(args.predictions), metrics))
    if args.out is not None:
        write_json(args.out, metrics)
        print(f"wrote {args.out}")
    return 0
