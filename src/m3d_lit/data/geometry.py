"""Where the model's grid lies in the source scan, and the way back: masks in the scan's own geometry.

Preprocessing reorients a scan to the canonical axes (`CANONICAL_AXES`), crops it to the head and resizes
the crop to the model's grid. `ScanGeometry` records what undoes those three steps (the source array's
shape and voxel-to-world affine, the crop box, the grid size), so a mask predicted on the grid can be
written over the file the user gave: same shape, same affine, left on the patient's left.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from m3d_lit.atomic import atomic_path, save_npy
from m3d_lit.errors import InputError

__all__ = [
    "CANONICAL_AXES",
    "Scan",
    "ScanGeometry",
    "check_mask_path",
    "grid_affine",
    "manifest_geometry",
    "to_canonical_transform",
    "write_mask",
]

CANONICAL_AXES = ("S", "P", "L")  # nibabel axis codes of D, H, W: the radiological display of axial CT
MASK_SUFFIXES = (".nii", ".nii.gz", ".npy")


class Scan(NamedTuple):
    """One scan as read: the canonical HU volume plus what places its stored array in the world.

    Args:
        hu: float32 D x H x W in canonical orientation.
        spacing: (slice, row, column) in mm, in the canonical axis order.
        affine: 4 x 4 voxel-to-RAS (mm) affine of the array as the source stores it.
        stored_shape: that array's shape (NIfTI: i, j, k; DICOM: column, row, slice).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    stored_shape: tuple[int, int, int]


def to_canonical_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from an array with this voxel-to-RAS affine to the canonical axes."""
    return orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(CANONICAL_AXES)
    )


def grid_affine(size: Sequence[int]) -> np.ndarray:
    """A 1 mm voxel-to-RAS affine that declares the canonical axes for an array on a D x H x W grid."""
    # the grid is a RAS-ordered array (affine eye(4)) reoriented to the canonical axes
    from_ras = orientations.ornt_transform(
        orientations.axcodes2ornt(("R", "A", "S")), orientations.axcodes2ornt(CANONICAL_AXES)
    )
    ras_shape = [int(size[int(new_axis)]) for new_axis, _ in from_ras]
    return orientations.inv_ornt_aff(from_ras, ras_shape)


@dataclass(frozen=True)
class ScanGeometry:
    """What undoes the preprocessing of one scan.

    Args:
        shape: the source array's shape as stored (NIfTI: the file's i, j, k; DICOM: column, row, slice).
        affine: 4 x 4 voxel-to-RAS (mm) affine of that array (DICOM: from ImagePositionPatient,
            ImageOrientationPatient, PixelSpacing and the slice step, LPS turned to RAS).
        box: the crop to the head, (start, stop) per canonical axis D, H, W.
        size: the model grid (D, H, W) the crop was resized to.
    """

    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    box: tuple[tuple[int, int], ...]
    size: tuple[int, int, int]

    @classmethod
    def build(cls, shape: Sequence[int], affine: np.ndarray, box: Sequence[slice], size: Sequence[int]):
        """From the reader's shape and affine and the crop as slices (`preprocess.foreground_box`)."""
        canonical = _canonical_shape(tuple(int(s) for s in shape), np.asarray(affine, np.float64))
        bounds = tuple(tuple(int(v) for v in part.indices(n)[:2]) for part, n in zip(box, canonical))
        return cls(
            tuple(int(s) for s in shape),
            tuple(tuple(float(v) for v in row) for row in np.asarray(affine, np.float64)),
            bounds,
            tuple(int(s) for s in size),
        )

    @property
    def affine_array(self) -> np.ndarray:
        return np.array(self.affine, np.float64)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return _canonical_shape(self.shape, self.affine_array)

    def to_source(self, grid: np.ndarray) -> np.ndarray:
        """A mask or foreground probabilities on the model grid (D x H x W) -> uint8 {0, 1} in the source's
        stored shape: resize back to the crop (trilinear, then > 0.5), paste into the canonical volume,
        undo the reorientation."""
        grid = np.asarray(grid, np.float32)
        if grid.shape != self.size:
            raise ValueError(f"mask of shape {grid.shape} is not on the model grid {self.size}")
        crop = tuple(hi - lo for lo, hi in self.box)
        # the inverse of `preprocess.resize`'s mapping (voxel centres, align_corners=False)
        up = F.interpolate(
            torch.from_numpy(np.ascontiguousarray(grid))[None, None],
            size=crop,
            mode="trilinear",
            align_corners=False,
        )
        canonical = np.zeros(self.canonical_shape, np.uint8)
        canonical[tuple(slice(lo, hi) for lo, hi in self.box)] = up[0, 0].numpy() > 0.5
        back = orientations.ornt_transform(
            orientations.axcodes2ornt(CANONICAL_AXES), orientations.io_orientation(self.affine_array)
        )
        return np.ascontiguousarray(orientations.apply_orientation(canonical, back))

    def to_json(self) -> str:
        return json.dumps({"shape": self.shape, "affine": self.affine, "box": self.box, "size": self.size})

    @classmethod
    def from_json(cls, text: str, where: str | PathLike) -> ScanGeometry:
        """Parse `to_json`'s text; anything else is an `InputError` naming `where`."""
        try:
            obj: dict[str, Any] = json.loads(text)
            shape, size = tuple(int(v) for v in obj["shape"]), tuple(int(v) for v in obj["size"])
            affine = np.array(obj["affine"], np.float64)
            box = tuple((int(lo), int(hi)) for lo, hi in obj["box"])
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(where, f"unreadable scan geometry ({type(e).__name__}: {e})") from None
        if len(shape) != 3 or len(size) != 3 or affine.shape != (4, 4) or len(box) != 3:
            raise InputError(
                where, "scan geometry needs a 3D shape, a 4 x 4 affine, 3 box ranges and a 3D size"
            )
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise InputError(where, "scan geometry has a degenerate or non-finite affine")
        geometry = cls(shape, tuple(tuple(row) for row in affine.tolist()), box, size)
        if any(not 0 <= lo < hi <= n for (lo, hi), n in zip(box, geometry.canonical_shape)):
            raise InputError(where, f"crop box {box} lies outside the volume {geometry.canonical_shape}")
        return geometry


def _canonical_shape(shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
    out = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(to_canonical_transform(affine)):
        out[int(new_axis)] = shape[axis]
    return out[0], out[1], out[2]


def manifest_geometry(image: str | PathLike) -> ScanGeometry | None:
    """The geometry `m3d-lit prepare` recorded for `OUT/images/<id>.npy` (column `geometry` of
    `OUT/manifest.csv`); None where there is none (M3D-Data, or prepared before it was recorded)."""
    image = Path(image)
    manifest = image.parent.parent / "manifest.csv"
    if image.parent.name != "images" or not manifest.is_file():
        return None
    stem = image.name[: -len(".npy")] if image.name.endswith(".npy") else image.stem
    with manifest.open(newline="", encoding="utf-8") as handle:
        row = next((r for r in csv.DictReader(handle) if r.get("id") == stem), None)
    if row is None or not row.get("geometry"):
        return None
    return ScanGeometry.from_json(row["geometry"], manifest)


def check_mask_path(path: str | PathLike) -> Path:
    """Refuse a mask path `write_mask` cannot write (checked before any work is spent on the mask)."""
    path = Path(path)
    if not path.name.lower().endswith(MASK_SUFFIXES):
        raise InputError(path, f"unknown mask format; use one of {', '.join(MASK_SUFFIXES)}")
    if not path.parent.is_dir():
        raise InputError(path, "its folder does not exist")
    return path


def write_mask(path: str | PathLike, grid: np.ndarray, geometry: ScanGeometry | None) -> None:
    """Write a mask predicted on the model grid (D x H x W, probabilities or {0, 1}), atomically.

    `.nii`/`.nii.gz` with a geometry: the source scan's shape and affine, to lay over the file it came from.
    `.nii`/`.nii.gz` without one (an `.npy` input): the model grid, with an affine that declares the
    canonical axes at 1 mm. `.npy`: always the model grid, uint8 1 x D x H x W like the prepared masks.
    """
    path = check_mask_path(path)
    name = path.name.lower()
    on_grid = (np.asarray(grid, np.float32) > 0.5).astype(np.uint8)
    suffix = next(s for s in MASK_SUFFIXES if name.endswith(s))
    if suffix == ".npy":
        save_npy(path, on_grid[None])
        return
    data, affine = (
        (on_grid, grid_affine(on_grid.shape))
        if geometry is None
        else (geometry.to_source(grid), geometry.affine_array)
    )
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)  # scanner coordinates: what a viewer overlays the source with
    image.set_sform(affine, code=1)
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, str(tmp))
