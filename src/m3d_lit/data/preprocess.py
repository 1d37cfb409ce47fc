"""Preprocessing: HU window, min-max to [0, 1], crop to the head, resize to the model's input size.

`load_and_preprocess` is the one entry point for a single scan (DICOM folder, `.dcm`, NIfTI or npy);
`prepare` and the eval/ask commands both use it, so training and inference see the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from m3d_lit.data.geometry import ScanGeometry
from m3d_lit.data.io import check_finite, find_series, load_scan, read_nifti_scan, read_npy
from m3d_lit.errors import InputError

__all__ = [
    "DEFAULT_PATCH",
    "DEFAULT_SIZE",
    "WINDOWS",
    "Prepared",
    "apply_window",
    "check_size",
    "foreground_box",
    "load_and_preprocess",
    "minmax",
    "preprocess",
    "preprocess_with_box",
    "resize",
]

DEFAULT_SIZE = (32, 256, 256)
DEFAULT_PATCH = (4, 16, 16)
# name -> (level, width) in HU; None = no window, plain min-max over the volume (the M3D paper's choice).
WINDOWS: dict[str, tuple[float, float] | None] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "bone": (600.0, 2800.0),
    "none": None,
}
HEAD_THRESHOLD_HU = -500.0


class Prepared(NamedTuple):
    """One preprocessed scan.

    Args:
        image: float32 1 x D x H x W in [0, 1].
        mask: uint8 {0, 1} 1 x D x H x W on the image's grid, or None.
        orig_shape: D x H x W as read (canonical orientation).
        spacing: (slice, row, column) spacing in mm as read; (1, 1, 1) for npy input.
        geometry: what takes a mask on the image's grid back to the source scan's shape and affine;
            None for npy input, which has no world coordinates (its masks stay on the model grid).
        read_from: the file or DICOM series folder the volume was read from (a folder of several series
            gives the series `io.pick_series` chose).
    """

    image: np.ndarray
    mask: np.ndarray | None
    orig_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    geometry: ScanGeometry | None = None
    read_from: Path | None = None


def check_size(size: Sequence[int], patch: Sequence[int] = DEFAULT_PATCH) -> tuple[int, int, int]:
    """Return `size` as a tuple after checking it is 3 positive ints divisible by `patch`."""
    size, patch = tuple(int(s) for s in size), tuple(int(p) for p in patch)
    if len(size) != 3 or len(patch) != 3 or min(size) < 1 or min(patch) < 1:
        raise InputError("size", f"{size} and patch size {patch} must be 3 positive integers each")
    if any(s % p for s, p in zip(size, patch)):
        raise InputError("size", f"{size} is not divisible by the patch size {patch}")
    return size  # type: ignore[return-value]


def minmax(volume: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant volume gives zeros (never NaN)."""
    lo, hi = float(volume.min()), float(volume.max())
    if hi - lo < 1e-6:
        return np.zeros(volume.shape, np.float32)
    return ((volume - lo) / (hi - lo)).astype(np.float32)


def apply_window(hu: np.ndarray, window: str = "brain") -> np.ndarray:
    """Clip HU to a named window (see `WINDOWS`), then min-max to [0, 1]."""
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {sorted(WINDOWS)}")
    bounds = WINDOWS[window]
    if bounds is None:
        return minmax(hu)
    level, width = bounds
    return minmax(np.clip(hu, level - width / 2, level + width / 2))


def foreground_box(hu: np.ndarray, threshold: float = HEAD_THRESHOLD_HU) -> tuple[slice, slice, slice]:
    """Bounding box of voxels above `threshold` HU (the head), widened in-plane to a square where the
    volume allows so that resizing keeps the head's proportions. The whole volume if nothing is above."""
    inside = hu > threshold
    if not inside.any():
        return (slice(None), slice(None), slice(None))
    box = []
    for axis in range(3):
        hit = np.nonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        box.append([int(hit[0]), int(hit[-1]) + 1])
    side = max(box[1][1] - box[1][0], box[2][1] - box[2][0])
    for axis in (1, 2):
        lo, hi = box[axis]
        length = min(side, hu.shape[axis])
        start = max(0, min(lo - (length - (hi - lo)) // 2, hu.shape[axis] - length))
        box[axis] = [start, start + length]
    return tuple(slice(lo, hi) for lo, hi in box)  # type: ignore[return-value]


def resize(volume: np.ndarray, size: Sequence[int], mask: bool = False) -> np.ndarray:
    """Resize D x H x W to `size`: trilinear for images, nearest for masks (kept binary)."""
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if tuple(t.shape[2:]) != tuple(size):
        mode = "nearest-exact" if mask else "trilinear"
        t = F.interpolate(t, size=tuple(size), mode=mode, **({} if mask else {"align_corners": False}))
    out = t[0, 0].numpy()
    return (out > 0.5).astype(np.uint8) if mask else out.astype(np.float32)


def preprocess(
    hu: np.ndarray,
    size: Sequence[int] = DEFAULT_SIZE,
    window: str = "brain",
    source: str | PathLike = "volume",
) -> np.ndarray:
    """HU volume D x H x W -> float32 1 x D' x H' x W' in [0, 1] (window, crop to head, resize).

    Args:
        hu: the volume in Hounsfield units, canonical orientation.
        size: output (D, H, W), divisible by the patch size.
        window: a name in `WINDOWS`.
        source: the file the volume came from, named in errors.
    """
    return preprocess_with_box(hu, None, size, window, source)[0]


def preprocess_with_box(
    hu: np.ndarray,
    mask: np.ndarray | None,
    size: Sequence[int] = DEFAULT_SIZE,
    window: str = "brain",
    source: str | PathLike = "volume",
) -> tuple[np.ndarray, np.ndarray | None, tuple[slice, slice, slice]]:
    """As `preprocess`, with a mask cropped and resized on exactly the image's grid (nearest, binary), and the
    crop box (in the canonical volume) that a `ScanGeometry` records."""
    size = check_size(size)
    if hu.ndim != 3:
        raise InputError(source, f"expected a 3D volume, got shape {hu.shape}")
    check_finite(hu, source)
    if mask is not None and mask.shape != hu.shape:
        raise ValueError(f"mask shape {mask.shape} differs from volume shape {hu.shape}")
    box = foreground_box(hu)
    image = resize(apply_window(hu[box], window), size)[None]
    if mask is None:
        return image, None, box
    return image, resize(mask[box] > 0, size, mask=True)[None], box


def load_and_preprocess(
    path: str | PathLike,
    size: Sequence[int] = DEFAULT_SIZE,
    window: str = "brain",
    mask_path: str | PathLike | None = None,
) -> Prepared:
    """Read one scan and preprocess it.

    Args:
        path: a DICOM series folder, a CQ500 scan folder (series chosen by `io.choose_series`), a `.dcm`
            file, a `.nii`/`.nii.gz` file, or an M3D-Data `.npy` (already in [0, 1]: passed through
            unchanged when it has `size`, else only resized).
        size: output (D, H, W), divisible by the patch size (4, 16, 16).
        window: a name in `WINDOWS` (ignored for npy).
        mask_path: a NIfTI mask on the image's grid (NIfTI images only).

    The returned `geometry` takes a mask on the model grid back to the scan as stored
    (`ScanGeometry.to_source`, `geometry.write_mask`).
    """
    path, size = Path(path), check_size(size)
    if path.name.lower().endswith(".npy"):
        if mask_path is not None:
            raise ValueError("mask_path is supported for NIfTI images only")
        volume = read_npy(path)
        return Prepared(resize(volume, size)[None], None, volume.shape, (1.0, 1.0, 1.0), None, path)
    read_from = find_series(path) if path.is_dir() else path
    if mask_path is not None:
        scan, mask = read_nifti_scan(path, mask_path)
    else:
        scan, mask = load_scan(read_from), None
    image, out_mask, box = preprocess_with_box(scan.hu, mask, size, window, path)
    geometry = ScanGeometry.build(scan.stored_shape, scan.affine, box, size)
    return Prepared(image, out_mask, scan.hu.shape, scan.spacing, geometry, read_from)
