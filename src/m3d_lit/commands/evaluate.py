"""`m3d-lit eval`: batched generation over a QA split, then metrics and a report.

    m3d-lit eval --checkpoint checkpoints/stage3/last.ckpt --data data/cq500/qa_test.jsonl --out runs/eval
                 [--batch-size 8] [--blank-images | --swap-images] [--save-masks] [--max-new-tokens 64]
                 [--device cpu|cuda] [--dtype auto|float32|bfloat16|float64]
                 [--protocol m3d|corpus] [--bootstrap 1000] [--seed 0] [--bertscore-model DIR]

Writes OUT/predictions.jsonl (one object per sample; closed Yes/No answers carry `p_yes`, the softmax of
the first answer token's `Yes` and `No` logits), OUT/metrics.json and OUT/report.md, and the headline
scores to TensorBoard under OUT/tensorboard at the checkpoint's global step. `--save-masks` writes each
predicted mask to OUT/masks/<id>.nii.gz in the source scan's geometry (shape and affine of the NIfTI or
DICOM series that `prepare` read, as its manifest records), so it lies over the original file in a viewer;
its path goes in the prediction's `mask_file`. Volumes without a recorded geometry (M3D-Data `.npy`) keep
the model grid. The controls below save no masks (they would not be about the question's scan).
`--blank-images` replaces every volume with zeros: the control that
shows whether the answers depend on the scan at all. `--swap-images` gives every question another patient's
scan from the same file, a control that stays among real head CTs (a model that reads the scan drops to
chance there, while a zero volume may throw it off entirely).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from m3d_lit.atomic import write_json, write_jsonl
from m3d_lit.commands.arguments import CommandParser
from m3d_lit.commands.score import add_protocol_options, protocol_options
from m3d_lit.data.collate import make_collator
from m3d_lit.data.datasets import QAJsonlDataset
from m3d_lit.errors import InputError
from m3d_lit.evaluation.generation import MaskSaver, annotate, generate_records
from m3d_lit.evaluation.report import write_report
from m3d_lit.evaluation.scoring import compute_metrics
from m3d_lit.tasks.loading import load_task
from m3d_lit.tasks.official import known_window

__all__ = ["main", "tensorboard_scalars"]

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="m3d-lit eval", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="stage-2/3 checkpoint or an M3D-LaMed directory"
    )
    parser.add_argument("--data", required=True, type=Path, help="a qa_*.jsonl written by m3d-lit prepare")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch (1 = one by one)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--blank-images", action="store_true", help="replace every volume with zeros")
    control.add_argument(
        "--swap-images", action="store_true", help="give every question another patient's scan"
    )
    parser.add_argument(
        "--save-masks", action="store_true", help="write predicted masks to OUT/masks/ in the scans' geometry"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="auto",
        help="weights and activations: auto = bfloat16 on CUDA, float32 on CPU; float64 makes greedy "
        "decoding independent of how a machine orders its sums (exact comparisons, e.g. batch sizes)",
    )
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    add_protocol_options(parser)
    return parser


def _check_window(data: Path, record: dict[str, Any]) -> None:
    """Refuse a QA file whose scans `prepare` windowed otherwise than the model's training data were."""
    settings = data.parent / "prepare.json"
    want = known_window(record)
    if want is None or not settings.is_file():
        return
    try:
        window = json.loads(settings.read_text(encoding="utf-8")).get("window")
    except (OSError, ValueError, AttributeError):
        return
    if window is not None and window != want:
        raise InputError(
            data,
            f"was prepared with window {window!r}; this model reads scans with window {want!r}: "
            f"prepare it again with `m3d-lit prepare ... --window {want}`",
        )


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    options = protocol_options(parser, args)
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
    device = torch.device(args.device)
    task, saved = load_task(args.checkpoint, device=str(device))
    _check_window(args.data, saved)
    model = task.model
    model.to(DTYPES[args.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    img_size = tuple(model.img_size)
    dataset = QAJsonlDataset(
        args.data, img_size=img_size, blank_images=args.blank_images, swapped_images=args.swap_images
    )
    save_mask = None
    if args.save_masks:
        save_mask = MaskSaver(args.out / "masks", {r.id: r.image for r in dataset.records})
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    collate = make_collator(model, generation=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.workers)
    records = []
    label = "blank scans" if args.blank_images else "swapped scans" if args.swap_images else "scans"
    with tqdm(total=len(dataset), desc=f"eval {args.data.name} ({label})", unit="sample") as bar:
        for record in generate_records(model, loader, args.max_new_tokens, device, save_mask):
            records.append(record)
            bar.update(1)
    annotate(records, args.data)
    metrics = compute_metrics(records, args.protocol, **options)
    metrics["setup"] = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "blank_images": args.blank_images,
        "swapped_images": args.swap_images,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "save_masks": args.save_masks,
        "global_step": saved.get("global_step"),
        "p_yes": "softmax of the first answer token's Yes and No logits",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "predictions.jsonl", records)
    write_json(args.out / "metrics.json", metrics)
    position = {record["id"]: i for i, record in enumerate(records)}
    write_report(
        args.out,
        metrics,
        records,
        title=f"{args.data} ({label})",
        images=lambda record: dataset[position[record["id"]]]["image"],
    )
    _to_tensorboard(args.out / "tensorboard", metrics, saved.get("global_step") or 0)
    print(f"wrote {args.out / 'predictions.jsonl'}, metrics.json and report.md")
    return 0


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
