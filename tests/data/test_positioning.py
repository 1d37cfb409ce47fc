"""Positioning samples: comprehension and generation questions built from a segmentation mask."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from m3d_lit.boxes import format_box, parse_boxes
from m3d_lit.data.positioning import REC_QUESTIONS, REG_ANSWERS, positioning_samples


@pytest.fixture
def mask() -> np.ndarray:
    """1 x 8 x 16 x 32: slices 2-4, rows 3-8, columns 4-6 and one outlying voxel at (7, 15, 20)."""
    m = np.zeros((1, 8, 16, 32), dtype=np.uint8)
    m[0, 2:5, 3:9, 4:7] = 1
    m[0, 7, 15, 20] = 1
    return m


# x over W = 32 (columns 4..20), y over H = 16 (rows 3..15), z over D = 8 (slices 2..7), voxel-edged.
EXTENT = [4 / 32, 3 / 16, 2 / 8, 21 / 32, 16 / 16, 8 / 8]
HALF_STEP = 0.5e-3 + 1e-12  # three decimals round by at most half a step


def test_box_is_the_mask_extent(mask):
    rec, reg = positioning_samples("hemorrhage", mask)
    assert rec["kind"] == "rec" and reg["kind"] == "reg"
    assert rec["box"] == EXTENT and reg["box"] == EXTENT
    assert parse_boxes(rec["answer"]) == [pytest.approx(EXTENT, abs=HALF_STEP)]
    assert parse_boxes(reg["question"]) == [pytest.approx(EXTENT, abs=HALF_STEP)]
    assert parse_boxes(rec["question"]) == [] and parse_boxes(reg["answer"]) == []


def test_canonical_wording(mask):
    rec, reg = positioning_samples("left  kidney ", mask)
    box = format_box(EXTENT)
    assert rec["question"] == "Where is the left kidney in this image? Please output the bounding box."
    assert rec["answer"] == f"The left kidney is at {box}."
    assert reg["question"] == f"What is in the region {box}?"
    assert reg["answer"] == "It is the left kidney."
    assert positioning_samples("left kidney", mask) == [rec, reg]
    json.dumps([rec, reg])  # the samples go to jsonl as they are


def test_seeded_paraphrases(mask):
    first = positioning_samples("ventricles", mask, rng=random.Random(3))
    assert positioning_samples("ventricles", mask, rng=random.Random(3)) == first
    runs = [positioning_samples("ventricles", mask, rng=random.Random(seed)) for seed in range(40)]
    questions = {rec["question"] for rec, _ in runs}
    assert questions == {q.format(s="ventricles") for q in REC_QUESTIONS}
    assert {reg["answer"] for _, reg in runs} == {a.format(s="ventricles") for a in REG_ANSWERS}
    assert all(rec["box"] == EXTENT and "ventricles" in rec["question"] for rec, _ in runs)


def test_decimals(mask):
    rec, _ = positioning_samples("skull", mask, decimals=2)
    assert "[0.12,0.19,0.25,0.66,1.00,1.00]" in rec["answer"]


def test_empty_mask_gives_no_samples():
    assert positioning_samples("hemorrhage", np.zeros((1, 4, 8, 8), dtype=np.uint8)) == []


def test_bad_input(mask):
    with pytest.raises(ValueError, match="structure must name"):
        positioning_samples("  ", mask)
    with pytest.raises(ValueError, match="mask must be"):
        positioning_samples("skull", np.ones((3, 4, 8, 8)))
