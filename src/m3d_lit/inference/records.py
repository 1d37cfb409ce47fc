"""Answering a prepared QA split: one prediction record per sample, the lines `eval` and `bench` write.

`prediction_records` feeds a Dataset's samples (in order, so a scan's questions stay together) through
the `Predictor` and yields `{"id", "dataset", "kind", "question", "answer", "prediction"}` plus `p_yes`
for a closed Yes/No question, Dice/IoU for a segmentation sample and `mask_file` when `MaskSaver` writes
the mask; `annotate` adds each record's patient and finding from its QA file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from m3d_lit.data.collate import SEG_TOKEN
from m3d_lit.data.geometry import manifest_geometry, write_mask
from m3d_lit.evaluation.closed import parse_closed
from m3d_lit.evaluation.segmentation import dice_iou
from m3d_lit.inference.predictor import Prediction, Predictor, Request
from m3d_lit.jsonl import read_jsonl

__all__ = ["MaskSaver", "annotate", "prediction_record", "prediction_records", "sample_requests"]


def sample_requests(samples: Any) -> Iterator[Request]:
    """A `Request` per Dataset sample; a closed question gets `p_yes` where its reference is Yes/No."""
    for sample in samples:
        closed = sample["kind"] == "closed" and parse_closed(sample["answer"]) is not None
        yield Request(sample["question"], sample["image"], str(sample["id"]), closed, extra=dict(sample))


def _seg_scores(seg_logits: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, Any]:
    """Dice/IoU of a segmentation sample whose reference holds a mask; no [SEG] means an empty mask."""
    if mask is None or mask.sum() == 0:
        return {"produced_seg": seg_logits is not None}
    pred = torch.zeros_like(mask) if seg_logits is None else (seg_logits.float().sigmoid() > 0.5).float()
    dice, iou = dice_iou(pred.cpu(), mask.cpu())
    return {"produced_seg": seg_logits is not None, "dice": float(dice), "iou": float(iou)}


def prediction_record(prediction: Prediction) -> dict[str, Any]:
    """The prediction record of an answer to a `sample_requests` request."""
    sample = prediction.request.extra
    record = {
        "id": prediction.request.id,
        "dataset": sample["dataset"],
        "kind": sample["kind"],
        "question": sample["question"],
        "answer": sample["answer"],
        "prediction": prediction.text,
    }
    if prediction.p_yes is not None:
        record["p_yes"] = prediction.p_yes
    if record["kind"] == "seg":
        # a mask trains and scores the segmentation only where the reference answer emits [SEG]
        mask = sample.get("mask") if SEG_TOKEN in sample["answer"] else None
        record.update(_seg_scores(prediction.seg_logits, mask))
    return record


def prediction_records(
    predictor: Predictor,
    dataset: Dataset,
    batch_size: int = 8,
    workers: int = 0,
    save_mask: Callable[[dict[str, Any], torch.Tensor], str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Answer every sample of `dataset` in order and yield its prediction record (module docstring).

    Args:
        predictor: the model.
        dataset: a Dataset of `Sample`s (`QAJsonlDataset`, `RecordDataset`).
        batch_size: questions answered together.
        workers: DataLoader processes that read the volumes ahead.
        save_mask: called with every answer's record and mask logits when it holds `[SEG]`; the path it
            returns goes in `mask_file`.
    """
    samples = DataLoader(dataset, batch_size=None, num_workers=workers)
    for prediction in predictor.predict(sample_requests(samples), batch_size):
        record = prediction_record(prediction)
        if save_mask is not None and prediction.seg_logits is not None:
            record["mask_file"] = save_mask(record, prediction.seg_logits)
        yield record


class MaskSaver:
    """Writes predicted masks to `folder/<id>.nii.gz` in the geometry of the scan each sample was read from.

    Args:
        folder: where the masks go (created with the first mask, so that no answer with `[SEG]` leaves
            no empty folder).
        images: sample id -> the prepared image it was given (`OUT/images/<id>.npy` of `prepare`).
    """

    def __init__(self, folder: Path, images: dict[str, Path]) -> None:
        self.folder, self.images = folder, images
        self.names: set[str] = set()
        self.geometries: dict[Path, Any] = {}

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
        self.folder.mkdir(parents=True, exist_ok=True)
        write_mask(path, seg_logits.float().sigmoid()[0].cpu().numpy(), geometry)
        return f"{self.folder.name}/{path.name}"


def annotate(records: list[dict[str, Any]], data: Path) -> None:
    """Add each record's `patient` (bootstrap unit) and, for closed questions, its `finding` (the
    question key of its `qid`), from the QA file's lines."""
    lines = [obj for _, obj in read_jsonl(data)]
    by_qid = {str(obj.get("qid") or obj.get("id")): obj for obj in lines}
    for record in records:
        source = by_qid.get(record["id"], {})
        record["patient"] = str(source.get("patient") or source.get("id") or record["id"])
        if record["kind"] == "closed" and ":" in str(source.get("qid", "")):
            record["finding"] = source["qid"].rsplit(":", 1)[1]
