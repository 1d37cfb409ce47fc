"""3D bounding boxes for positioning: the one text format, parsing, IoU and the box of a mask.

Convention. A box is six floats `[x1, y1, z1, x2, y2, z2]` in [0, 1] over a `1 x D x H x W` volume:
x runs along the width axis W (last), y along the height axis H, z along the depth axis D (slices).
Coordinates are continuous and voxel-edged: voxel `i` of an axis of length `n` covers `[i/n, (i+1)/n]`,
so a mask filling the whole volume has the box `[0, 0, 0, 1, 1, 1]` and no box of a non-empty mask is
flat. `x1 <= x2`, `y1 <= y2`, `z1 <= z2`.

Text format (exact, so that `format_box` output round-trips through `parse_boxes`):
`<bx_start>[0.125,0.250,0.000,0.875,0.750,1.000]<bx_end>`: the two special tokens, square brackets,
six fixed-point numbers with `decimals` digits (3 by default) joined by commas, no spaces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from m3d_lit.tokens import BX_END, BX_START

__all__ = ["box_iou_3d", "format_box", "mask_to_box", "parse_boxes", "rec_metrics"]

Box = list[float]

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# Six numbers separated by commas (any spaces), optionally in brackets and the box tokens. The
# look-arounds keep numbers whole and refuse six taken from the start of a longer list; `parse_boxes`
# refuses six that follow a comma (a look-behind cannot skip the spaces).
_BOX = re.compile(
    rf"(?:{re.escape(BX_START)})?\s*\[?\s*"
    rf"(?<![\d.])({_NUM}(?:\s*,\s*{_NUM}){{5}})(?!\.?\d|[eE][-+\d]|\s*,\s*[-+.\d])"
    rf"\s*\]?\s*(?:{re.escape(BX_END)})?"
)


def _check_box(box: Sequence[float], name: str = "box") -> list[float]:
    values = [float(v) for v in box]
    if len(values) != 6:
        raise ValueError(f"{name} must have 6 values [x1, y1, z1, x2, y2, z2], got {len(values)}: {values}")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name} values must be finite and in [0, 1], got {values}")
    if any(values[i] > values[i + 3] for i in range(3)):
        raise ValueError(f"{name} needs x1 <= x2, y1 <= y2, z1 <= z2, got {values}")
    return values


def format_box(box: Sequence[float], decimals: int = 3) -> str:
    """`<bx_start>[x1,y1,z1,x2,y2,z2]<bx_end>` with `decimals` fixed digits (see the module doc).

    Args:
        box: six values in [0, 1], corners ordered (`x1 <= x2` ...).
        decimals: digits after the point, 1 to 6.
    """
    if not 1 <= decimals <= 6:
        raise ValueError(f"decimals must be between 1 and 6, got {decimals}")
    values = _check_box(box)
    return f"{BX_START}[{','.join(f'{v:.{decimals}f}' for v in values)}]{BX_END}"


def parse_boxes(text: str) -> list[Box]:
    """Every box written in `text`, in order; [] when there is none.

    Accepts the exact `format_box` text and the forms a model or a decoder produces: spaces anywhere,
    missing `<bx_start>`/`<bx_end>` (decoding with `skip_special_tokens` drops them) or brackets.
    Corners given in the wrong order are swapped (the region is the same); a group with a value outside
    [0, 1] is not a box and is skipped.
    """
    boxes = []
    for match in _BOX.finditer(text):
        if text[: match.start(1)].rstrip().endswith(","):
            continue
        values = [float(v) for v in match.group(1).split(",")]
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            continue
        low = [min(values[i], values[i + 3]) for i in range(3)]
        high = [max(values[i], values[i + 3]) for i in range(3)]
        boxes.append(low + high)
    return boxes


def box_iou_3d(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes' volumes; 0.0 when the union is empty (two flat boxes)."""
    a, b = _check_box(a, "box a"), _check_box(b, "box b")
    inter = 1.0
    for i in range(3):
        inter *= max(0.0, min(a[i + 3], b[i + 3]) - max(a[i], b[i]))
    vol_a = math.prod(a[i + 3] - a[i] for i in range(3))
    vol_b = math.prod(b[i + 3] - b[i] for i in range(3))
    union = vol_a + vol_b - inter
    return inter / union if union > 0 else 0.0


def mask_to_box(mask: np.ndarray) -> Box | None:
    """The normalised box around the non-zero voxels of a `1 x D x H x W` or `D x H x W` mask.

    Returns None for an empty mask.
    """
    array = np.asarray(mask)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"mask must be 1 x D x H x W or D x H x W, got shape {array.shape}")
        array = array[0]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"mask must be 1 x D x H x W or D x H x W with no empty axis, got {array.shape}")
    coords = np.nonzero(array)
    if coords[0].size == 0:
        return None
    # Axes are (D, H, W) = (z, y, x); the box lists x, y, z.
    lows = [float(c.min()) / n for c, n in zip(coords, array.shape)]
    highs = [float(c.max() + 1) / n for c, n in zip(coords, array.shape)]
    return [lows[2], lows[1], lows[0], highs[2], highs[1], highs[0]]


def rec_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[float]], threshold: float = 0.5
) -> dict[str, float | int | None]:
    """Referring expression comprehension: mean IoU of the first predicted box and accuracy at IoU >= t.

    A prediction without a box scores IoU 0 and is counted in `rec_no_box`.

    Args:
        predictions: generated answers, one per sample.
        references: the reference box of each sample.
        threshold: the IoU a box needs to count as correct.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference boxes")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ious, missing = [], 0
    for text, ref in zip(predictions, references):
        boxes = parse_boxes(text)
        missing += not boxes
        ious.append(box_iou_3d(boxes[0], ref) if boxes else 0.0)
    n = len(ious)
    return {
        "rec_n": n,
        "rec_iou": sum(ious) / n if n else None,
        f"rec_acc@{threshold:g}": sum(iou >= threshold for iou in ious) / n if n else None,
        "rec_no_box": missing,
    }
