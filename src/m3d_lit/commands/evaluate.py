"""`m3d-lit eval`: batched generation over a QA split, then metrics and a report.

    m3d-lit eval --checkpoint runs/stage3 --data data/cq500 --out eval/cq500 [--overwrite]
                 [--batch-size 8] [--blank-images | --swap-images] [--save-masks] [--max-new-tokens 64]
                 [--device cpu|cuda] [--dtype auto|float32|bfloat16|float64]
                 [--protocol m3d|corpus] [--bootstrap 1000] [--seed 0] [--bertscore-model DIR]

`--checkpoint` is a checkpoint file, a run folder (`runs/stage3/version_0`: its newest checkpoint), a
stage folder (`runs/stage3`: its latest run), an `m3d-lit export` folder or an M3D-LaMed directory.
`--data` is a `qa_<split>.jsonl` written by `m3d-lit prepare`, or its folder (then `qa_test.jsonl`);
data prepared with another size or CT window than the model's training data are refused.

Prints the scores as `m3d-lit score` does, and writes OUT/predictions.jsonl (one object per sample; closed
Yes/No answers carry `p_yes`, the softmax of the first answer token's `Yes` and `No` logits),
OUT/metrics.json and OUT/report.md (both name the model: its file, sha256, run, step, the m3d-lit versions
and commits that trained and evaluated it, the date), and the headline scores to TensorBoard under
OUT/tensorboard at the checkpoint's global step. An OUT holding an earlier result is refused; `--overwrite`
replaces it whole (the new result is written beside it and takes its place only when complete).
`--save-masks` writes each predicted mask to OUT/masks/<id>.nii.gz in the source scan's geometry (shape and
affine of the NIfTI or DICOM series that `prepare` read, as its manifest records), so it lies over the
original file in a viewer; its path goes in the prediction's `mask_file`; a line says how many answers
produced `[SEG]` (without one there is no mask and no OUT/masks/). Volumes without a recorded geometry
(M3D-Data `.npy`) keep the model grid. The controls below save no masks (they would not be about the
question's scan). `--blank-images` replaces every volume with zeros: the control that shows whether the
answers depend on the scan at all. `--swap-images` gives every question another patient's scan from the same
file, a control that stays among real head CTs (a model that reads the scan drops to chance there, while a
zero volume may throw it off entirely).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from m3d_lit.atomic import atomic_folder, write_json, write_jsonl
from m3d_lit.commands.arguments import (
    CommandParser,
    answering_checkpoint_option,
    check_out_folder,
    inference_options,
)
from m3d_lit.commands.score import add_protocol_options, format_scores, protocol_options
from m3d_lit.data.datasets import QAJsonlDataset
from m3d_lit.data.provenance import prepared_settings
from m3d_lit.errors import InputError
from m3d_lit.evaluation.grouped_scores import compute_metrics
from m3d_lit.evaluation.markdown_report import write_report
from m3d_lit.inference.checkpoints import resolve_checkpoint
from m3d_lit.inference.predictor import Predictor
from m3d_lit.inference.records import MaskSaver, annotate, prediction_records

__all__ = ["RESULT_FILES", "main", "qa_file", "tensorboard_scalars"]

# what an eval writes into --out (report.md's figures included): a folder holding any of them is a result
RESULT_FILES = ("predictions.jsonl", "metrics.json", "report.md", "masks", "tensorboard", "examples",
                "closed_roc.png", "closed_balanced_accuracy.png")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="m3d-lit eval", description=__doc__.split("\n\n")[0])
    answering_checkpoint_option(parser)
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a qa_<split>.jsonl of m3d-lit prepare, or its folder (qa_test.jsonl)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="questions answered together (1 = one by one)"
    )
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--blank-images", action="store_true", help="replace every volume with zeros")
    control.add_argument(
        "--swap-images", action="store_true", help="give every question another patient's scan"
    )
    parser.add_argument(
        "--save-masks", action="store_true", help="write predicted masks to OUT/masks/ in the scans' geometry"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples (default: all)")
    inference_options(parser)
    parser.add_argument(
        "--workers", type=int, default=0, help="data loader processes that read volumes ahead"
    )
    add_protocol_options(parser)
    return parser


def qa_file(data: Path) -> Path:
    """The QA file `--data` names: a file as it is, a prepared folder's `qa_test.jsonl`."""
    if data.is_file():
        return data
    if not data.is_dir():
        raise InputError(data, "does not exist (a qa_<split>.jsonl of m3d-lit prepare, or its folder)")
    if (data / "qa_test.jsonl").is_file():
        return data / "qa_test.jsonl"
    splits = sorted(p.name for p in data.glob("qa_*.jsonl"))
    hint = f"; pass one of its files: {', '.join(splits)}" if splits else ": is it an m3d-lit prepare folder?"
    raise InputError(data, f"holds no qa_test.jsonl{hint}")


def _check_options(args: argparse.Namespace) -> str | None:
    for option, value in (
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
        ("--limit", args.limit),
        ("--workers", None if args.workers == 0 else args.workers),
    ):
        if value is not None and value < 1:
            raise InputError(option, f"{value} must be at least 1")
    control = "--blank-images" if args.blank_images else "--swap-images" if args.swap_images else None
    if args.save_masks and control:
        # a mask from a zero volume or another patient's scan, filed under this question's id, would be laid
        # over this patient's scan as if it were the model's answer about it
        raise InputError(
            "--save-masks",
            f"a {control} run's masks are not predictions for the question's scan: save masks without the control",
        )
    return control


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    options = protocol_options(parser, args)
    _check_options(args)
    resolve_checkpoint(args.checkpoint)  # a missing checkpoint is named before anything else
    data = qa_file(args.data)
    check_out_folder(args.out, args.overwrite, RESULT_FILES)
    predictor = Predictor.load(args.checkpoint, args.device, args.dtype, args.max_new_tokens)
    settings = prepared_settings(data.parent)
    if settings is not None:
        predictor.bundle.check_prepared(settings, data)
    for note in predictor.loaded.notes:  # after the checks: a refusal stays one line
        print(f"m3d-lit eval: {note}", file=sys.stderr)
    dataset = QAJsonlDataset(
        data, img_size=predictor.img_size, blank_images=args.blank_images, swapped_images=args.swap_images
    )
    images = {r.id: r.image for r in dataset.records}
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    label = "blank scans" if args.blank_images else "swapped scans" if args.swap_images else "scans"
    with atomic_folder(args.out) as out:
        save_mask = MaskSaver(out / "masks", images) if args.save_masks else None
        records = []
        with tqdm(total=len(dataset), desc=f"eval {data.name} ({label})", unit="sample") as bar:
            for record in prediction_records(predictor, dataset, args.batch_size, args.workers, save_mask):
                records.append(record)
                bar.update(1)
        annotate(records, data)
        metrics = compute_metrics(records, args.protocol, **options)
        metrics["setup"] = _setup(args, data, predictor)
        write_jsonl(out / "predictions.jsonl", records)
        write_json(out / "metrics.json", metrics)
        position = {record["id"]: i for i, record in enumerate(records)}
        write_report(out, metrics, records, title=f"{data} ({label})",
                     images=lambda record: dataset[position[record["id"]]]["image"])  # fmt: skip
        _to_tensorboard(out / "tensorboard", metrics, predictor.loaded.source.global_step or 0)
    print(format_scores(f"{data} ({label})", metrics))
    if args.save_masks:
        print(_masks_line(records, args.out / "masks"))
    print(f"wrote {args.out / 'predictions.jsonl'}, metrics.json and report.md")
    return 0


def _masks_line(records: list[dict[str, Any]], folder: Path) -> str:
    """What `--save-masks` wrote: how many masks, or why there is none (no answer produced `[SEG]`)."""
    written, total = sum("mask_file" in record for record in records), len(records)
    if written:
        return f"--save-masks: {written} of {total} answers produced [SEG]: their masks are in {folder}/"
    questions = sum(record["kind"] == "seg" for record in records)
    asked = (
        f"{questions} of the {total} samples are segmentation questions"
        if questions
        else "the data hold no segmentation question (PhysioNet and folder sources with masks have them)"
    )
    return f"--save-masks: no mask written: no answer produced [SEG] ({asked})"


def _setup(args: argparse.Namespace, data: Path, predictor: Predictor) -> dict[str, Any]:
    return {
        "checkpoint": str(args.checkpoint),
        "model": predictor.loaded.provenance(),
        "data": str(data),
        "blank_images": args.blank_images,
        "swapped_images": args.swap_images,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "dtype": str(predictor.dtype).removeprefix("torch."),
        "save_masks": args.save_masks,
        "global_step": predictor.loaded.source.global_step,
        "p_yes": "softmax of the first answer token's Yes and No logits",
    }


def tensorboard_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The report's headline numbers as TensorBoard tags: text metrics (tagged with the protocol), closed
    AUROC/sensitivity/specificity/balanced accuracy per finding and pooled, open-question F1 per type,
    Dice; for all records and per dataset."""
    out: dict[str, float] = {}
    protocol = metrics.get("protocol", "m3d")
    groups = [("all", metrics)] + list((metrics.get("by_dataset") or {}).items())
    for name, group in groups:
        for key, value in group.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                text = key.startswith(("bleu", "rouge", "meteor", "bertscore"))
                out[f"eval/{name}/{key}" + (f"_{protocol}" if text else "")] = float(value)
        for finding, row in (group.get("closed") or {}).items():
            tag = "".join(c if c.isalnum() else "_" for c in finding)
            for key in ("auroc", "sensitivity", "specificity", "balanced_accuracy"):
                if row.get(key) is not None:
                    out[f"eval/{name}/closed/{tag}/{key}"] = float(row[key])
        for key, row in ((group.get("open_findings") or {}).get("types") or {}).items():
            out[f"eval/{name}/open/{key}/f1"] = float(row["f1"])
    return out


def _to_tensorboard(folder: Path, metrics: dict[str, Any], step: int) -> None:
    with SummaryWriter(str(folder)) as writer:
        for tag, value in tensorboard_scalars(metrics).items():
            writer.add_scalar(tag, value, step)
