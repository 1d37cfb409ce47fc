"""Batched generation over prepared samples: one prediction record per sample, and what goes with it.

`generate_records` runs a LaMed model's greedy `generate` over a DataLoader and yields the records that
`m3d-lit eval` and `m3d-lit bench` score (`p_yes` for closed Yes/No questions, Dice/IoU for segmentation
samples, the path of a saved mask); `MaskSaver` writes predicted masks in the source scan's geometry;
`annotate` adds each record's patient and finding from its QA file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from m3d_lit.data.collate import row_masks
from m3d_lit.data.geometry import manifest_geometry, write_mask
from m3d_lit.evaluation.closed import parse_closed
from m3d_lit.evaluation.metrics import dice_iou

__all__ = ["MaskSaver", "annotate", "generate_records", "yes_no_ids", "yes_probability"]


def _seg_scores(seg_logits: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, Any]:
    """Dice/IoU of a segmentation sample whose reference holds a mask; no [SEG] means an empty mask."""
    if mask is None or mask.sum() == 0:
        return {"produced_seg": seg_logits is not None}
    mask = mask.float()  # batches carry bool masks
    pred = torch.zeros_like(mask) if seg_logits is None else (seg_logits.float().sigmoid() > 0.5).float()
    dice, iou = dice_iou(pred.cpu(), mask.cpu())
    return {"produced_seg": seg_logits is not None, "dice": float(dice), "iou": float(iou)}


def yes_no_ids(tokenizer: Any) -> tuple[int, int] | None:
    """The first token of an answer starting with `Yes`, and of one starting with `No`; None when both
    start with the same token (a SentencePiece model that splits off the word-start marker `▁`, as the
    parity kit's tiny one does), where the first token cannot tell them apart and no `p_yes` is given."""
    yes, no = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("Yes", "No"))
    return None if yes == no else (yes, no)


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int) -> float:
    """P(Yes) against No from one row of first-token logits: a softmax over those two logits alone."""
    pair = torch.stack([logits[yes_id], logits[no_id]]).double()
    return float(torch.softmax(pair, dim=0)[0])


@torch.no_grad()
def generate_records(
    model: torch.nn.Module,
    loader: DataLoader,
    max_new_tokens: int,
    device: torch.device,
    save_mask: Callable[[dict[str, Any], torch.Tensor], str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Generate an answer per sample (greedy, batched) and yield one prediction record per sample.

    A closed Yes/No question's record also holds `p_yes`: P(Yes) / (P(Yes) + P(No)) of the first
    answer token, from the logits the greedy answer starts from. `save_mask(record, seg_logits)`, when
    given, is called for every sample that produced `[SEG]`; the path it returns goes in the record's
    `mask_file`.
    """
    pair_ids = yes_no_ids(model.tokenizer)
    for batch in loader:
        masks = row_masks(batch)
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
            if pair_ids and record["kind"] == "closed" and parse_closed(record["answer"]) is not None:
                record["p_yes"] = yes_probability(out["first_logits"][i], *pair_ids)
            if record["kind"] == "seg":
                record.update(_seg_scores(out["seg_logits"][i], masks[i]))
            if save_mask is not None and out["seg_logits"][i] is not None:
                record["mask_file"] = save_mask(record, out["seg_logits"][i])
            yield record


class MaskSaver:
    """Writes predicted masks to `folder/<id>.nii.gz` in the geometry of the scan each sample was read from.

    Args:
        folder: where the masks go (created).
        images: sample id -> the prepared image it was given (`OUT/images/<id>.npy` of `prepare`).
    """

    def __init__(self, folder: Path, images: dict[str, Path]) -> None:
        self.folder, self.images = folder, images
        self.names: set[str] = set()
        self.geometries: dict[Path, Any] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: dict[str, Any], seg_logits: torch.Tensor) -> str:
        image = self.images[record["id"]]
        if image not in self.geometries:
            self.geometries[image] = manifest_geometry(image)
            if self.geometries[image] is None:
                tqdm.write(
                    f"m3d-lit eval: no scan geometry recorded for {image}: its masks stay on the model grid"
                )
        geometry = self.geometries[image]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", record["id"])
        while name in self.names:  # ids that differ only in characters a file name cannot hold
            name += "_"
        self.names.add(name)
        path = self.folder / f"{name}.nii.gz"
        write_mask(path, seg_logits.float().sigmoid()[0].cpu().numpy(), geometry)
        return f"{self.folder.name}/{path.name}"


def annotate(records: list[dict[str, Any]], data: Path) -> None:
    """Add each record's `patient` (bootstrap unit) and, for closed questions, its `finding` (the
    question key of its `qid`), from the QA file's lines."""
    lines = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_qid = {str(obj.get("qid") or obj.get("id")): obj for obj in lines if isinstance(obj, dict)}
    for record in records:
        source = by_qid.get(record["id"], {})
        record["patient"] = str(source.get("patient") or source.get("id") or record["id"])
        if record["kind"] == "closed" and ":" in str(source.get("qid", "")):
            record["finding"] = source["qid"].rsplit(":", 1)[1]
