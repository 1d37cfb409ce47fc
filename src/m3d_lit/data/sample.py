"""The data contract: what a Dataset item holds (`Sample`) and what turns a list of them into a batch.

Every dataset of m3d-lit (`RecordDataset`, `QAJsonlDataset`, `MixDataset`) yields `Sample`s; the
collators (`data/collate.py`, built by `make_collator`) turn a list of them into the batch the tasks read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypedDict

from torch import Tensor

__all__ = ["Collator", "Sample"]


class Sample(TypedDict):
    """One item of a Dataset (docs/architecture.md "Samples and batches")."""

    id: str
    """The sample's id (a scan id, with a suffix per question)."""
    image: Tensor
    """The prepared volume, float32 1 x D x H x W."""
    question: str
    """The question (the wording drawn for this epoch at train time)."""
    answer: str
    """The reference answer (stage 1: the report)."""
    kind: str
    """`open`, `closed`, `seg`, `caption`, ... (the metrics group by it)."""
    mask: Tensor | None
    """The target mask, float 1 x D x H x W with values 0/1, or None."""
    dataset: str
    """Which dataset the sample comes from (`cq500`, `physionet`, `m3d_vqa`, ...)."""


class Collator(Protocol):
    """A list of samples -> one batch dict (`ClipCollator`, `LMCollator`)."""

    def __call__(self, items: Sequence[Sample]) -> dict[str, Any]: ...
