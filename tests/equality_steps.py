"""The float64 stage-3 steps the exact-comparison tests take: weights drawn per name, fixed batches.

Shared by `models/test_training_equality.py` (what is learned stays what was learned before) and
`models/test_compile.py` (compiled blocks give the eager loss and gradients). Every weight is drawn from a
generator seeded by its name, so the values do not depend on the order in which the model is built.
"""

from __future__ import annotations

import inspect
import math
import zlib
from typing import Any

import torch


def seeded_generator(name: str) -> torch.Generator:
    """A generator seeded by `name` alone (its CRC32), the same in every process and run."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


@torch.no_grad()
def draw_weights(model: torch.nn.Module) -> None:
    """Every parameter, and the one random buffer (SegVol's Fourier matrix), drawn from a generator seeded
    by its name (LoRA B included, so LoRA A learns)."""
    for name, buffer in model.named_buffers():
        if name.endswith("gaussian_matrix"):
            buffer.copy_(torch.randn(buffer.shape, generator=seeded_generator(name), dtype=torch.float64))
    for name, param in model.named_parameters():
        gen = seeded_generator(name)
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        if param.dim() >= 2:
            param.copy_(noise / math.sqrt(param.shape[-1]))
        elif "norm" in name or name.endswith("gamma"):
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(0.1 * noise)


def batch_items(model: torch.nn.Module) -> list[list[dict[str, Any]]]:
    """Three batches of three dataset items at the model's image size, from a fixed seed: `[SEG]` rows with
    masks, a blanked volume, closed and open questions of different lengths."""
    gen = torch.Generator().manual_seed(7)
    size = (1, *model.img_size)

    def item(i: int, question: str, answer: str, kind: str, mask: bool = False, blank: bool = False) -> dict:
        image = torch.zeros(size) if blank else torch.rand(size, generator=gen)
        return {
            "id": f"s{i}",
            "image": image,
            "question": question,
            "answer": answer,
            "kind": kind,
            "mask": (torch.rand(size, generator=gen) > 0.7).float() if mask else None,
            "dataset": "test",
        }

    return [
        [
            item(0, "Segment the hemorrhage.", "It is [SEG].", "seg", mask=True),
            item(1, "Is there a calvarial fracture?", "No.", "closed"),
            item(2, "Describe the findings.", "There is a bleed on the left side with mass effect.", "open"),
        ],
        [
            item(3, "Is there a bleed?", "Yes.", "closed", blank=True),
            item(4, "Segment the hemorrhage.", "It is [SEG].", "seg", mask=True),
            item(5, "Is there a mass effect?", "No.", "closed"),
        ],
        [
            item(6, "Describe the findings.", "No acute intracranial abnormality.", "open"),
            item(7, "Is there a bleed?", "Yes, on the right.", "closed", mask=True),
            item(8, "Segment the hemorrhage.", "It is [SEG].", "seg", mask=True),
        ],
    ]


def forward_batch(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The model called with every batch key its forward takes, as the tasks call it."""
    names = inspect.signature(model.forward).parameters
    return model(**{k: v for k, v in batch.items() if k in names})
