"""Segmentation overlap, the one definition of Dice: the soft Dice loss on probabilities, and the hard
Dice and IoU of thresholded masks that validation (`tasks/metrics.MeanDice`) and evaluation
(`evaluation/segmentation.dice_iou`) report. All per sample (rows without a target are dropped by the
caller)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from m3d_lit.losses import at_least_fp32

__all__ = ["bce_loss", "dice_loss", "hard_dice_iou", "overlap"]


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.shape != target.shape or logits.dim() < 2:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must match, B x ...")


def overlap(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample of B x ... masks or probabilities: (sum of pred * target, sum of pred + sum of target)."""
    pred, target = pred.flatten(1), target.to(pred.dtype).flatten(1)
    return (pred * target).sum(1), pred.sum(1) + target.sum(1)


def hard_dice_iou(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Dice 2|P&T|/(|P|+|T|) and IoU |P&T|/|P or T| per sample of boolean B x ... masks, in float64
    (exact counts); both masks empty count 1: nothing to find and nothing predicted."""
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(f"masks {tuple(pred.shape)} and {tuple(target.shape)} must match, B x ...")
    inter, total = overlap(pred.double(), target.double())
    empty = total == 0
    dice = torch.where(empty, torch.ones_like(total), 2.0 * inter / total.clamp_min(1.0))
    iou = torch.where(empty, torch.ones_like(total), inter / (total - inter).clamp_min(1.0))
    return dice, iou


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0, smooth_numerator: bool = True) -> Tensor:
    """1 - (2 |p t| + s) / (|p| + |t| + s) per sample, with p = sigmoid(logits); returns shape B.

    Args:
        logits: B x ... mask logits.
        target: B x ... binary mask (float).
        smooth: added to numerator and denominator; an empty prediction of an empty mask scores 0.
        smooth_numerator: False adds `smooth` to the denominator only, as M3D's `BinaryDiceLoss` does
            (an empty prediction of an empty mask then scores 1).
    """
    _check(logits, target)
    inter, total = overlap(at_least_fp32(logits).sigmoid(), target)
    numerator = 2.0 * inter + (smooth if smooth_numerator else 0.0)
    return 1.0 - numerator / (total + smooth)


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy with logits, averaged over the voxels of each sample; returns shape B."""
    _check(logits, target)
    logits = at_least_fp32(logits)
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return loss.flatten(1).mean(1)
