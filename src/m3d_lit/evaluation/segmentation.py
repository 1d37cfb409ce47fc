"""Segmentation scores of predictions: Dice and IoU of one sample, and their means per task or class.

A sample's Dice and IoU come from `losses.segmentation.hard_dice_iou`, the one definition that
validation's `MeanDice` uses too (both masks empty count 1).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from m3d_lit.losses.segmentation import hard_dice_iou

__all__ = ["dice_iou", "seg_metrics"]


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        tensor = array.detach().cpu()
        # numpy has no bfloat16; bool stays bool so a mask is not mistaken for logits.
        return tensor.float().numpy() if tensor.dtype.is_floating_point else tensor.numpy()
    return np.asarray(array)


def dice_iou(pred_logits_or_mask: Any, target: Any, threshold: float = 0.5) -> tuple[float, float]:
    """Dice and IoU of one sample's thresholded prediction against its mask (numpy or torch).

    Args:
        pred_logits_or_mask: float array = logits (foreground where sigmoid > `threshold`; a float
            {0, 1} mask also works at 0.5); bool/integer array = a mask (foreground where non-zero).
        target: the true mask, foreground where > 0.5; same shape as the prediction.
        threshold: probability threshold applied to the sigmoid of float predictions, in (0, 1).

    Both empty counts as a perfect match (1.0, 1.0): nothing to find and nothing predicted.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    pred, truth = _to_numpy(pred_logits_or_mask), _to_numpy(target)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {truth.shape}")
    if np.issubdtype(pred.dtype, np.floating):
        # sigmoid(x) > t  <=>  x > log(t / (1 - t)), without overflow in exp.
        pred_mask = pred.astype(np.float64) > math.log(threshold / (1.0 - threshold))
    else:
        pred_mask = pred != 0
    true_mask = truth.astype(np.float64) > 0.5
    dice, iou = hard_dice_iou(torch.from_numpy(pred_mask)[None], torch.from_numpy(true_mask)[None])
    return float(dice[0]), float(iou[0])


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def seg_metrics(records: Sequence[Mapping[str, Any]], group: Any = None) -> dict[str, Any]:
    """Mean Dice over samples with a non-empty reference mask, per group (e.g. class) when `group` is given.

    Samples with an empty mask have no Dice; `negative_seg_rate` is the share of them for which the model
    still produced `[SEG]` (a mask where there is nothing).

    Args:
        records: `seg` prediction records with `dice` (positives) and `produced_seg`.
        group: record -> group name; None gives no per-group table.
    """
    positives = [r for r in records if r.get("dice") is not None]
    negatives = [r for r in records if r.get("dice") is None]
    out: dict[str, Any] = {
        "n": len(records),
        "n_positive": len(positives),
        "dice": _mean([float(r["dice"]) for r in positives]),
        "iou": _mean([float(r["iou"]) for r in positives]),
        "produced_seg_rate": _mean([float(bool(r.get("produced_seg"))) for r in positives]),
        "negative_seg_rate": _mean([float(bool(r.get("produced_seg"))) for r in negatives]),
    }
    if group is not None:
        classes: dict[str, list[float]] = defaultdict(list)
        for record in positives:
            classes[str(group(record))].append(float(record["dice"]))
        out["dice_by_class"] = {name: _mean(values) for name, values in sorted(classes.items())}
        out["dice_class_mean"] = _mean([v for v in out["dice_by_class"].values() if v is not None])
    return out
