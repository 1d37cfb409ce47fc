"""CLIP-style contrastive loss and retrieval recall."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from m3d_lit.losses import at_least_fp32

__all__ = ["clip_loss", "recall_at_k"]


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric cross-entropy over the image-text similarity matrix; pair i matches pair i.

    The features are those of the whole (global) batch: under DDP the task gathers them first.

    Args:
        image_features: N x E, L2-normalised.
        text_features: N x E, L2-normalised.
        logit_scale: the exponentiated temperature (e.g. 1 / 0.07), not its log.
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} "
            "must both be N x E"
        )
    logits = logit_scale * at_least_fp32(image_features) @ at_least_fp32(text_features).t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def recall_at_k(sim: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recall@k both ways for a square similarity matrix (row i matches column i).

    Returns `{"i2t_R@k": ..., "t2i_R@k": ...}` for each k (k larger than N counts as N).
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square N x N matrix, got {tuple(sim.shape)}")
    n = sim.shape[0]
    target = torch.arange(n, device=sim.device)
    out: dict[str, float] = {}
    for name, matrix in (("i2t", sim), ("t2i", sim.t())):
        # Rank of the true match = how many candidates score strictly higher.
        true_score = matrix[target, target].unsqueeze(1)
        rank = (matrix > true_score).sum(1)
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < min(k, n)).float().mean().item()
    return out
