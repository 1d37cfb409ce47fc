"""Positioning samples from any segmentation mask: referring expression comprehension and generation.

- comprehension (`kind="rec"`): the question names a structure, the answer holds its box;
- generation (`kind="reg"`): the question gives a box, the answer names the structure.

The box is the mask's extent (`m3d_lit.boxes.mask_to_box`: `[x1, y1, z1, x2, y2, z2]` in
[0, 1], x along W, y along H, z along D) written with `format_box`. As in `m3d_lit.data.phrasing`, the
first template of each list is the canonical wording (val/test, or no rng); training passes a seeded
`random.Random` to pick among all of them.
"""

from __future__ import annotations

import random

import numpy as np

from m3d_lit.boxes import format_box, mask_to_box
from m3d_lit.data.phrasing import pick

__all__ = ["REC_ANSWERS", "REC_QUESTIONS", "REG_ANSWERS", "REG_QUESTIONS", "positioning_samples"]

REC_QUESTIONS = (
    "Where is the {s} in this image? Please output the bounding box.",
    "Can you locate the {s} and give its bounding box?",
    "Please output the bounding box of the {s}.",
    "Find the {s} in this scan and answer with its coordinates.",
)
REC_ANSWERS = ("The {s} is at {box}.", "Coordinates: {box}.", "It is at {box}.")

REG_QUESTIONS = (
    "What is in the region {box}?",
    "Which structure lies inside the bounding box {box}?",
    "Can you name the structure at {box}?",
    "Please identify what the box {box} contains.",
)
REG_ANSWERS = ("It is the {s}.", "The region contains the {s}.", "The box holds the {s}.")


def positioning_samples(
    structure: str, mask: np.ndarray, rng: random.Random | None = None, decimals: int = 3
) -> list[dict]:
    """One comprehension and one generation sample for the structure a mask outlines.

    Returns `[{"question", "answer", "kind": "rec", "box"}, {... "kind": "reg" ...}]`, `box` being the
    mask's exact normalised box (the text rounds it to `decimals`); [] for an empty mask (nothing to
    locate).

    Args:
        structure: the structure's name as it should read in a sentence, e.g. "hemorrhage", "left kidney".
        mask: `1 x D x H x W` or `D x H x W`, non-zero voxels inside the structure.
        rng: a seeded `random.Random` for training paraphrases; None gives the canonical wording.
        decimals: digits written for each box coordinate.
    """
    name = " ".join(structure.split())
    if not name:
        raise ValueError(f"structure must name something, got {structure!r}")
    box = mask_to_box(mask)
    if box is None:
        return []
    text = format_box(box, decimals)
    rec = {
        "question": pick(REC_QUESTIONS, rng).format(s=name),
        "answer": pick(REC_ANSWERS, rng).format(s=name, box=text),
        "kind": "rec",
        "box": box,
    }
    reg = {
        "question": pick(REG_QUESTIONS, rng).format(box=text),
        "answer": pick(REG_ANSWERS, rng).format(s=name),
        "kind": "reg",
        "box": box,
    }
    return [rec, reg]
