"""Segmentation losses on mask logits, per sample (rows without a target are dropped by the caller)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from m3d_lit.losses import at_least_fp32

__all__ = ["dice_loss", "bce_loss"]


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.shape != target.shape or logits.dim() < 2:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must match, B x ...")


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
    prob = at_least_fp32(logits).sigmoid().flatten(1)
    target = target.to(prob.dtype).flatten(1)
    inter = (prob * target).sum(1)
    numerator = 2.0 * inter + (smooth if smooth_numerator else 0.0)
    return 1.0 - numerator / (prob.sum(1) + target.sum(1) + smooth)


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy with logits, averaged over the voxels of each sample; returns shape B."""
    _check(logits, target)
    logits = at_least_fp32(logits)
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return loss.flatten(1).mean(1)
