"""The language-model loss on the labelled positions only: LM head and cross-entropy in row chunks.

Only the answer tokens carry labels (about 3% of a stage-3 row at the paper's size), so the head runs
on the hidden states of the positions that predict a label, never on the whole B x L x V. The rows go
through the head in chunks of `CHUNK_ROWS`, each chunk under non-reentrant activation checkpointing:
backward keeps the chunk's hidden rows (N x H) and recomputes its logits, so at most one chunk's
logits (and their fp32 copy) exist at a time, whatever the number of labelled tokens. The loss is the
mean over the labelled positions, the quantity `F.cross_entropy(..., ignore_index=-100)` gives on the
full logits (`full_lm_loss`, kept for the official-parity path and as the reference in the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from m3d_lit.losses import at_least_fp32

__all__ = ["CHUNK_ROWS", "IGNORE_INDEX", "chunked_lm_loss", "full_lm_loss", "label_positions"]

IGNORE_INDEX = -100
# 256 rows x 32k vocabulary: 33 MB of bf16 logits and 2 x 66 MB in fp32 (copy and gradient) per chunk.
CHUNK_ROWS = 256


def label_positions(labels: Tensor) -> Tensor:
    """Flat indices `b * L + t` of the positions whose next token is labelled (`labels[b, t + 1]`).

    The collator computes them on the host (`LMCollator`); computing them here from device labels waits
    for the device (`nonzero`), so this is the fallback for direct calls.
    """
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return valid.flatten().nonzero().flatten()


def full_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy over full logits (B x L x V), the positions labelled -100 ignored."""
    shifted = labels[:, 1:]
    if not bool((shifted != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    flat = at_least_fp32(logits[:, :-1].reshape(-1, logits.shape[-1]))
    return F.cross_entropy(flat, shifted.reshape(-1), ignore_index=IGNORE_INDEX)


def _chunk(head: Callable[[Tensor], Tensor], rows: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = at_least_fp32(head(rows))
    return F.cross_entropy(logits, targets, reduction="sum"), logits.detach().argmax(-1)


def chunked_lm_loss(
    head: Callable[[Tensor], Tensor],
    hidden: Tensor,
    labels: Tensor,
    positions: Tensor,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean next-token cross-entropy at `positions`, with the head applied only there.

    Args:
        head: hidden rows (N x H) -> logits (N x V).
        hidden: last-layer hidden states, B x L x H.
        labels: B x L token labels (-100: not trained).
        positions: flat indices `b * L + t` whose label `labels[b, t + 1]` is trained (`label_positions`).
        chunk_rows: rows per head call.

    Returns:
        (loss, predicted, targets): `predicted` is the argmax token at each position and `targets` its
        label (both N), what token accuracy counts. With no position the loss is 0 with a zero gradient
        to every weight the head reads, as the full-logit loss gives.
    """
    targets = labels.flatten().index_select(0, positions + 1)
    if positions.numel() == 0:
        return head(hidden[:, :1].flatten(0, 1)).sum() * 0.0, targets.clone(), targets
    rows = hidden.flatten(0, 1).index_select(0, positions)
    total, predicted = [], []
    for start in range(0, rows.shape[0], chunk_rows):
        part = (rows[start : start + chunk_rows], targets[start : start + chunk_rows])
        if torch.is_grad_enabled() and rows.requires_grad:
            loss, guess = checkpoint(_chunk, head, *part, use_reentrant=False)
        else:
            loss, guess = _chunk(head, *part)
        total.append(loss)
        predicted.append(guess)
    return torch.stack(total).sum() / rows.shape[0], torch.cat(predicted), targets
