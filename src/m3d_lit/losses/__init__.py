"""Losses, computed in at least float32 whatever precision the model runs in."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["at_least_fp32"]


def at_least_fp32(x: Tensor) -> Tensor:
    """`x` in float32, or in its own dtype when that is wider: bf16 logits are widened, float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
