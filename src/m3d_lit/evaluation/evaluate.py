"""`m3d-lit eval`: batched generation over a QA split, then metrics and a report.

    m3d-lit eval --checkpoint checkpoints/stage3/last.ckpt --data data/cq500/qa_test.jsonl --out runs/eval
                 [--batch-size 8] [--blank-images | --swap-images] [--max-new-tokens 64] [--device cpu|cuda]

Writes OUT/predictions.jsonl (one object per sample), OUT/metrics.json and OUT/report.md, and the metrics
to TensorBoard under OUT/tensorboard. `--blank-images` replaces every volume with zeros: the control that
shows whether the answers depend on the scan at all. `--swap-images` gives every question another patient's
scan from the same file, a control that stays among real head CTs (a model that reads the scan drops to
chance there, while a zero volume may throw it off entirely).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from m3d_lit.arguments import CommandParser
from m3d_lit.errors import InputError

__all__ = ["generate_records", "main", "write_jsonl"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _seg_scores(seg_logits: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, Any]:
    """Dice/IoU of a segmentation sample whose reference holds a mask; no [SEG] means an empty mask."""
    from m3d_lit.evaluation.metrics import dice_iou

    if mask is None or mask.sum() == 0:
        return {"produced_seg": seg_logits is not None}
    pred = torch.zeros_like(mask) if seg_logits is None else (seg_logits.float().sigmoid() > 0.5).float()
    dice, iou = dice_iou(pred.cpu(), mask.cpu())
    return {"produced_seg": seg_logits is not None, "dice": float(dice), "iou": float(iou)}


@torch.no_grad()
def generate_records(
    model: torch.nn.Module,
    loader: DataLoader,
    max_new_tokens: int,
    device: torch.device,
) -> Iterator[dict[str, Any]]:
    """Generate an answer per sample (greedy, batched) and yield one prediction record per sample."""
    for batch in loader:
        out = model.generate(
            batch["images"].to(device),
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
        )
        for i, text in enumerate(out["texts"]):
            record = {
                "id": batch["ids"][i],
                "dataset": batch["datasets"][i],
                "kind": batch["kinds"][i],
                "question": batch["questions"][i],
                "answer": batch["answers"][i],
                "prediction": text.strip(),
            }
            if record["kind"] == "seg":
                mask = batch["masks"][i] if bool(batch["seg_flags"][i]) else None
                record.update(_seg_scores(out["seg_logits"][i], mask))
            yield record


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="m3d-lit eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="stage-2 or stage-3 checkpoint")
    parser.add_argument("--data", required=True, type=Path, help="a qa_*.jsonl written by m3d-lit prepare")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch (1 = one by one)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--blank-images", action="store_true", help="replace every volume with zeros")
    control.add_argument(
        "--swap-images", action="store_true", help="give every question another patient's scan"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    return parser


def main(argv: list[str]) -> int:
    from m3d_lit.data.collate import LMCollator
    from m3d_lit.data.datasets import QAJsonlDataset
    from m3d_lit.evaluation.metrics import compute_metrics
    from m3d_lit.evaluation.report import write_report
    from m3d_lit.evaluation.score import write_json
    from m3d_lit.tasks.loading import load_task

    args = _parser().parse_args(argv)
    for option, value in (
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
        ("--limit", args.limit),
        ("--workers", None if args.workers == 0 else args.workers),
    ):
        if value is not None and value < 1:
            raise InputError(option, f"{value} must be at least 1")
    device = torch.device(args.device)
    task, _ = load_task(args.checkpoint, device=str(device))
    model = task.model
    if device.type == "cuda":
        model.to(torch.bfloat16)
    img_size = tuple(model.img_size)
    dataset = QAJsonlDataset(
        args.data, img_size=img_size, blank_images=args.blank_images, swapped_images=args.swap_images
    )
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    collate = LMCollator(
        model.tokenizer, model.num_visual_tokens, model.max_length, img_size, generation=True
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.workers)
    records = []
    label = "blank scans" if args.blank_images else "swapped scans" if args.swap_images else "scans"
    with tqdm(total=len(dataset), desc=f"eval {args.data.name} ({label})", unit="sample") as bar:
        for record in generate_records(model, loader, args.max_new_tokens, device):
            records.append(record)
            bar.update(1)
    metrics = compute_metrics(records)
    metrics["setup"] = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "blank_images": args.blank_images,
        "swapped_images": args.swap_images,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
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
    _to_tensorboard(args.out / "tensorboard", metrics)
    print(f"wrote {args.out / 'predictions.jsonl'}, metrics.json and report.md")
    return 0


def _to_tensorboard(folder: Path, metrics: dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"eval/{key}", value, 0)
