"""Image-text retrieval scores (M3D-Bench task 1): recall@1/5/10 both ways per pool size, each pair's rank."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from m3d_lit.losses.contrastive import recall_at_k

__all__ = ["RETRIEVAL_KS", "retrieval_metrics"]

RETRIEVAL_KS = (1, 5, 10)


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, pools: Sequence[int]
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Recall@1/5/10 both ways over the first `min(pool, N)` pairs, per pool size.

    Returns the metrics (`pool_<p>`: `size`, `capped`, `i2t_R@k`, `t2i_R@k`), and the 0-based rank of
    each pair's true match image->text and text->image in the largest pool used (ties count in the
    pair's favour, as in `recall_at_k`).

    Args:
        image_features: N x E, L2-normalised, row i matching text row i.
        text_features: N x E, L2-normalised.
        pools: pool sizes, e.g. (100, 1000); a pool larger than N is capped at N (and says so).
    """
    n = image_features.shape[0]
    if n < 1 or text_features.shape[0] != n:
        raise ValueError(f"need N >= 1 image and text features alike, got {n} and {text_features.shape[0]}")
    metrics: dict[str, Any] = {}
    for pool in pools:
        size = min(pool, n)
        sim = image_features[:size].float() @ text_features[:size].float().T
        metrics[f"pool_{pool}"] = {"size": size, "capped": size < pool, **recall_at_k(sim, RETRIEVAL_KS)}
    size = min(max(pools), n)
    sim = image_features[:size].float() @ text_features[:size].float().T
    diagonal = sim.diagonal()
    i2t = (sim > diagonal[:, None]).sum(1)
    t2i = (sim.T > diagonal[:, None]).sum(1)
    return metrics, i2t, t2i
