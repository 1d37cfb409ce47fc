"""Boxes: the exact text format and its round trip, robust parsing, 3D IoU and the box of a mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3d_lit.boxes import box_iou_3d, format_box, mask_to_box, parse_boxes, rec_metrics

UNIT = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def boxes(draw) -> list[float]:
    pairs = [sorted((draw(UNIT), draw(UNIT))) for _ in range(3)]
    return [p[0] for p in pairs] + [p[1] for p in pairs]


def test_format_is_exact():
    box = [0.125, 0.25, 0.0, 0.875, 0.75, 1.0]
    assert format_box(box) == "<bx_start>[0.125,0.250,0.000,0.875,0.750,1.000]<bx_end>"
    assert format_box(box, decimals=1) == "<bx_start>[0.1,0.2,0.0,0.9,0.8,1.0]<bx_end>"


@settings(max_examples=200, deadline=None)
@given(boxes(), st.integers(min_value=1, max_value=6))
def test_round_trip(box, decimals):
    text = format_box(box, decimals)
    (parsed,) = parse_boxes(text)
    assert parsed == pytest.approx(box, abs=0.5 * 10**-decimals + 1e-12)
    assert format_box(parsed, decimals) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<bx_start> [ 0.1 , 0.2,0.3 , 0.4, 0.5, 0.6 ] <bx_end>", [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]),
        ("It is at [0.1, 0.2, 0.3, 0.4, 0.5, 0.6].", [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]),
        ("<bx_start>0,0,0,1,1,1<bx_end>", [[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]),
        ("The box is 0.1,0.2,0.3,0.4,0.5,1.", [[0.1, 0.2, 0.3, 0.4, 0.5, 1.0]]),
        ("swapped [0.4, 0.5, 0.6, 0.1, 0.2, 0.3]", [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]),
        (
            "[0,0,0,.5,.5,.5] and <bx_start>[0.5,0.5,0.5,1,1,1]<bx_end>",
            [[0, 0, 0, 0.5, 0.5, 0.5], [0.5] * 3 + [1] * 3],
        ),
        ("no box here", []),
        ("", []),
        ("[0.1, 0.2, 0.3, 0.4, 0.5]", []),
        ("[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]", []),
        ("[0.1, 0.2, 0.3, 0.4, 0.5, 1.5]", []),
        ("[-0.1, 0.2, 0.3, 0.4, 0.5, 0.6]", []),
    ],
)
def test_parse_boxes(text, expected):
    assert parse_boxes(text) == expected


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ([0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], 1.0),
        ([0, 0, 0, 1, 1, 1], [0, 0, 0, 0.5, 1, 1], 0.5),
        ([0, 0, 0, 1, 1, 1], [0.25, 0.25, 0.25, 0.75, 0.75, 0.75], 1 / 8),
        ([0, 0, 0, 0.5, 1, 1], [0.25, 0, 0, 0.75, 1, 1], 1 / 3),
        # overlap 1/4 per axis: 1/64 over 1/8 + 1/8 - 1/64 = 15/64
        ([0, 0, 0, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.75, 0.75, 0.75], 1 / 15),
        ([0, 0, 0, 0.5, 1, 1], [0.5, 0, 0, 1, 1, 1], 0.0),  # touching faces
        ([0, 0, 0, 0.2, 0.2, 0.2], [0.5, 0.5, 0.5, 1, 1, 1], 0.0),
        ([0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], 0.0),  # flat boxes have no volume
    ],
)
def test_iou_hand_computed(a, b, iou):
    assert box_iou_3d(a, b) == pytest.approx(iou)
    assert box_iou_3d(b, a) == pytest.approx(iou)


@pytest.mark.parametrize(
    "bad",
    [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1.2], [0.6, 0, 0, 0.5, 1, 1], [float("nan")] * 6],
)
def test_bad_boxes_raise(bad):
    with pytest.raises(ValueError, match="box"):
        format_box(bad)
    with pytest.raises(ValueError, match="box a"):
        box_iou_3d(bad, [0, 0, 0, 1, 1, 1])


def test_bad_decimals_raise():
    with pytest.raises(ValueError, match="decimals"):
        format_box([0, 0, 0, 1, 1, 1], decimals=0)


def test_mask_to_box_axes():
    mask = np.zeros((1, 4, 8, 16), dtype=np.uint8)
    mask[0, 1, 2, 3] = 1  # depth 1 (z), height 2 (y), width 3 (x)
    assert mask_to_box(mask) == [3 / 16, 2 / 8, 1 / 4, 4 / 16, 3 / 8, 2 / 4]
    mask[0, 3, 0, 10] = 1  # the box spans both voxels
    assert mask_to_box(mask[0]) == [3 / 16, 0.0, 1 / 4, 11 / 16, 3 / 8, 1.0]
    assert mask_to_box(np.ones((2, 3, 5), dtype=bool)) == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert mask_to_box(np.zeros((1, 4, 8, 16), dtype=np.float32)) is None


@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (4, 4), (1, 0, 4, 4)])
def test_mask_to_box_bad_shape(shape):
    with pytest.raises(ValueError, match="mask must be"):
        mask_to_box(np.ones(shape))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=7), min_size=12, max_size=12))
def test_iou_equals_voxel_iou(corners):
    """The IoU of two cuboid masks' boxes equals the IoU counted in voxels (voxel-edged boxes)."""
    masks = []
    for c in (corners[:6], corners[6:]):
        m = np.zeros((8, 8, 8), dtype=bool)
        lo, hi = [min(c[i], c[i + 3]) for i in range(3)], [max(c[i], c[i + 3]) for i in range(3)]
        m[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
        masks.append(m)
    voxel_iou = (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum()
    assert box_iou_3d(mask_to_box(masks[0]), mask_to_box(masks[1])) == pytest.approx(voxel_iou)


def test_rec_metrics():
    ref = [0, 0, 0, 0.5, 1, 1]
    predictions = [format_box(ref), "at [0.25, 0, 0, 0.75, 1, 1]", "I cannot tell."]
    metrics = rec_metrics(predictions, [ref] * 3)
    assert metrics == {
        "rec_n": 3,
        "rec_iou": pytest.approx((1 + 1 / 3) / 3),
        "rec_acc@0.5": 1 / 3,
        "rec_no_box": 1,
    }
    assert rec_metrics(predictions, [ref] * 3, threshold=0.3)["rec_acc@0.3"] == 2 / 3
    assert rec_metrics([], [])["rec_iou"] is None
    with pytest.raises(ValueError, match="2 predictions but 1"):
        rec_metrics(predictions[:2], [ref])
