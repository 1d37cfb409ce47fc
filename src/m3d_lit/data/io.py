"""Volume readers: DICOM series, NIfTI and npy, all returned in one canonical orientation.

Canonical array: D x H x W with axis 0 inferior -> superior (slices), axis 1 anterior -> posterior
(rows) and axis 2 patient right -> patient left (columns): the radiological display of axial CT.
Spacing is returned in the same axis order, in mm. Every failure raises `InputError` naming the file
or folder and the problem; nothing from a DICOM header that identifies a person is ever returned.
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel import orientations
from pydicom.errors import InvalidDicomError

from m3d_lit.data.geometry import CANONICAL_AXES, Scan, to_canonical_transform
from m3d_lit.errors import InputError

__all__ = [
    "CANONICAL_AXES",
    "Scan",
    "check_finite",
    "find_series",
    "list_series",
    "load_scan",
    "load_volume",
    "read_dicom_scan",
    "read_dicom_series",
    "read_nifti",
    "read_nifti_scan",
    "pick_series",
    "read_mask",
    "read_nifti_with_mask",
    "read_npy",
]

DICOM_SUFFIXES = {"", ".dcm", ".dicom"}
Spacing = tuple[float, float, float]
_PLAIN = re.compile(r"plain|pre[ _-]?contrast|non[ _-]?contrast|\bncct\b|\bnc\b", re.IGNORECASE)
_NOT_PLAIN = re.compile(r"post|contrast|\bcect\b|\bc\+|bone", re.IGNORECASE)


def check_finite(volume: np.ndarray, path: str | PathLike) -> np.ndarray:
    """Raise `InputError` if the volume holds NaN or inf values."""
    bad = volume.size - int(np.isfinite(volume).sum())
    if bad:
        raise InputError(path, f"volume holds {bad} NaN/inf values of {volume.size}")
    return volume


def _canonical(volume: np.ndarray, affine_ras: np.ndarray, path: Path) -> tuple[np.ndarray, Spacing]:
    """Reorient a volume with a voxel->RAS affine to the canonical D x H x W axes; spacing to match."""
    if not np.isfinite(affine_ras).all() or abs(np.linalg.det(affine_ras[:3, :3])) < 1e-9:
        raise InputError(path, "the voxel-to-world affine is degenerate or not finite")
    transform = to_canonical_transform(affine_ras)
    out = np.ascontiguousarray(orientations.apply_orientation(volume, transform))
    zooms = np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))
    spacing = [0.0, 0.0, 0.0]
    for axis, (new_axis, _) in enumerate(transform):
        spacing[int(new_axis)] = float(zooms[axis])
    return out, (spacing[0], spacing[1], spacing[2])


# ---------------------------------------------------------------- DICOM


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in DICOM_SUFFIXES
    )


def _read_slice(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise InputError(path, "not a DICOM file (no 128-byte preamble and 'DICM' prefix)") from None
    except Exception as e:  # pydicom raises many types on corrupt files; the user needs the file name
        raise InputError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise InputError(path, "DICOM file has no pixel data")
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag not in ds:
            raise InputError(path, f"DICOM slice has no {tag}")
    return ds


def _slice_hu(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    except Exception as e:  # corrupt or unsupported pixel data
        raise InputError(path, f"cannot decode pixel data ({type(e).__name__}: {e})") from None
    if pixels.ndim != 2:
        raise InputError(path, f"expected one 2D slice per file, got pixel array of shape {pixels.shape}")
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _series_geometry(folder: Path, files: list[Path], slices: list) -> tuple[np.ndarray, list[int], float]:
    """Direction cosines, the order of slices along the normal, and the slice spacing; checks gaps."""
    orient = np.array([float(v) for v in slices[0].ImageOrientationPatient]).reshape(2, 3)
    for f, ds in zip(files, slices):
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orient.reshape(-1), atol=1e-3):
            raise InputError(folder, f"slices with different orientations ({files[0].name} vs {f.name})")
    normal = np.cross(orient[0], orient[1])
    pos = np.array([np.dot([float(v) for v in ds.ImagePositionPatient], normal) for ds in slices])
    order = [int(i) for i in np.argsort(pos, kind="stable")]
    if len(slices) == 1:
        return orient, order, float(slices[0].get("SliceThickness", 1.0) or 1.0)
    gaps = np.diff(pos[order])
    step = float(np.median(gaps))
    if gaps.min() < 1e-3:
        i = int(gaps.argmin())
        raise InputError(folder, f"two slices at the same position {pos[order][i]:.2f} mm")
    if gaps.max() > 1.5 * step:
        i = int(gaps.argmax())
        raise InputError(
            folder,
            f"missing slice(s): gap of {gaps[i]:.2f} mm after position {pos[order][i]:.2f} mm "
            f"where slices are {step:.2f} mm apart",
        )
    return orient, order, step


def read_dicom_series(folder: str | PathLike) -> tuple[np.ndarray, Spacing]:
    """Read one DICOM series folder as HU: (float32 D x H x W, spacing); see `read_dicom_scan`."""
    scan = read_dicom_scan(folder)
    return scan.hu, scan.spacing


def read_dicom_scan(folder: str | PathLike) -> Scan:
    """Read one DICOM series folder as HU, with its patient-coordinate geometry.

    Args:
        folder: a folder holding the slices of one series (files `*.dcm`, `*.dicom` or no suffix;
            hidden files and other suffixes are ignored). A single `.dcm` file is a one-slice series.

    Returns:
        a `Scan`: HU in canonical orientation, slices ordered by ImagePositionPatient along the slice
        normal; the stored array is (column, row, slice) with its affine from ImagePositionPatient,
        ImageOrientationPatient, PixelSpacing and the slice step.
    """
    folder = Path(folder)
    files = [folder] if folder.is_file() else (_dicom_files(folder) if folder.is_dir() else [])
    if not files:
        raise InputError(folder, "no DICOM files (*.dcm) found")
    slices = [_read_slice(f) for f in files]
    modalities = sorted({str(ds.get("Modality", "?")) for ds in slices})
    if modalities != ["CT"]:
        raise InputError(folder, f"modality {'/'.join(modalities)}, expected CT")
    sizes = sorted({(int(ds.Rows), int(ds.Columns)) for ds in slices})
    if len(sizes) > 1:
        raise InputError(folder, f"mixed slice sizes {sizes} in one series")
    orient, order, step = _series_geometry(folder, files, slices)
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    if min(row_mm, col_mm, step) <= 0:
        raise InputError(folder, f"non-positive spacing (rows {row_mm}, columns {col_mm}, slices {step})")
    # NIfTI's habit (as dcm2niix): x = column (along the row cosine), y = row (along the column cosine),
    # z = slice (along the normal, in the sorted order).
    stored = np.ascontiguousarray(
        np.stack([_slice_hu(slices[i], files[i]) for i in order]).transpose(2, 1, 0)
    )
    affine = np.eye(4)
    affine[:3, 0] = orient[0] * col_mm
    affine[:3, 1] = orient[1] * row_mm
    affine[:3, 2] = np.cross(orient[0], orient[1]) * step
    affine[:3, 3] = [float(v) for v in slices[order[0]].ImagePositionPatient]
    affine[:2] *= -1  # LPS -> RAS
    hu, spacing = _canonical(stored, affine, folder)
    return Scan(check_finite(hu, folder), spacing, affine, stored.shape)


# ---------------------------------------------------------------- study folders with several series


def list_series(scan_dir: str | PathLike) -> list[Path]:
    """Every folder under `scan_dir` (any depth) that directly holds DICOM files."""
    scan_dir = Path(scan_dir)
    found = [p for p in sorted(scan_dir.rglob("*")) if p.is_dir() and _dicom_files(p)]
    return found + ([scan_dir] if _dicom_files(scan_dir) else [])


def _series_key(series: Path, target_mm: float) -> tuple:
    name = series.name
    rank = 2 if _NOT_PLAIN.search(name) and not _PLAIN.search(name) else (0 if _PLAIN.search(name) else 1)
    files = _dicom_files(series)
    try:
        head = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["SliceThickness"])
        thickness = float(head.get("SliceThickness", 0) or 0)
    except Exception:  # an unreadable series sorts last here; reading it later names the problem
        thickness = float("inf")
    return rank, abs(thickness - target_mm), -len(files), name


def find_series(folder: str | PathLike) -> Path:
    """The series of a folder: the folder itself when it holds DICOM files, else `pick_series`'s choice."""
    folder = Path(folder)
    return folder if _dicom_files(folder) else pick_series(folder)


def pick_series(scan_dir: str | PathLike, target_mm: float = 5.0) -> Path:
    """Pick one series of a folder holding several (a study, a CQ500 scan folder).

    Rule: plain/non-contrast names first (then names saying nothing, then contrast or bone series), then
    slice thickness nearest `target_mm`, then the most slices, then the name.
    """
    scan_dir = Path(scan_dir)
    series = list_series(scan_dir)
    if not series:
        raise InputError(scan_dir, "no series folder with DICOM files in this scan")
    return min(series, key=lambda s: _series_key(s, target_mm))


# ---------------------------------------------------------------- NIfTI and npy


def _nifti_data(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel/zlib raise many types for truncated or malformed files
        raise InputError(path, f"cannot read NIfTI ({type(e).__name__}: {e})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 1:
        raise InputError(path, f"expected a 3D volume, got shape {data.shape}")
    return data, affine


def read_nifti(path: str | PathLike) -> tuple[np.ndarray, Spacing]:
    """Read a NIfTI volume (`.nii`, `.nii.gz`) reoriented to canonical axes: (float32 D x H x W, spacing)."""
    scan, _ = read_nifti_scan(path)
    return scan.hu, scan.spacing


def read_nifti_with_mask(
    path: str | PathLike, mask_path: str | PathLike
) -> tuple[np.ndarray, np.ndarray, Spacing]:
    """Read a NIfTI image and its mask: (volume float32, mask uint8 {0, 1}, spacing); see `read_nifti_scan`."""
    scan, mask = read_nifti_scan(path, mask_path)
    return scan.hu, mask, scan.spacing


def read_nifti_scan(
    path: str | PathLike, mask_path: str | PathLike | None = None
) -> tuple[Scan, np.ndarray | None]:
    """Read a NIfTI image (and its mask), both through exactly the image's reorientation.

    Args:
        path: the image.
        mask_path: a mask on the same voxel grid (same shape and affine); any non-zero voxel is 1.

    Returns:
        (the `Scan`, the mask as uint8 {0, 1} D x H x W or None).
    """
    path = Path(path)
    data, affine = _nifti_data(path)
    volume, spacing = _canonical(data, affine, path)
    scan = Scan(check_finite(volume, path), spacing, affine, data.shape)
    if mask_path is None:
        return scan, None
    return scan, read_mask(mask_path, scan, path)


def read_mask(mask_path: str | PathLike, scan: Scan, image: str | PathLike) -> np.ndarray:
    """Read a NIfTI mask stored on a scan's grid (same array shape and affine as `scan`'s stored array,
    NIfTI or DICOM) through exactly the scan's reorientation: uint8 {0, 1} D x H x W, non-zero is 1.

    Args:
        mask_path: the mask file.
        scan: the scan it outlines.
        image: the scan's file or folder (named in the messages).
    """
    mask_path, image = Path(mask_path), Path(image)
    mask, mask_affine = _nifti_data(mask_path)
    if mask.shape != tuple(scan.stored_shape):
        raise InputError(
            mask_path,
            f"mask shape {mask.shape} differs from image shape {tuple(scan.stored_shape)} ({image.name})",
        )
    if not np.allclose(mask_affine, scan.affine, atol=1e-3):
        raise InputError(mask_path, f"mask affine differs from the affine of {image.name}")
    check_finite(mask, mask_path)
    mask, _ = _canonical(mask, scan.affine, image)
    return (mask > 0).astype(np.uint8)


def read_npy(path: str | PathLike) -> np.ndarray:
    """Read an M3D-Data style `.npy` volume (1 x D x H x W or D x H x W, values in [0, 1]); returns D x H x W."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for bad files
        raise InputError(path, f"cannot read .npy ({type(e).__name__}: {e})") from None
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "fiub":
        raise InputError(path, f"expected a numeric array, got {getattr(data, 'dtype', type(data))}")
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3 or min(data.shape) < 1:
        raise InputError(path, f"expected a 1 x D x H x W or D x H x W volume, got shape {data.shape}")
    data = check_finite(data.astype(np.float32), path)
    if data.min() < -1e-3 or data.max() > 1 + 1e-3:
        raise InputError(path, f"values span [{data.min():.3g}, {data.max():.3g}], expected [0, 1]")
    return data


def load_volume(path: str | PathLike) -> tuple[np.ndarray, Spacing]:
    """Read one scan in HU (see `load_scan`): (hu D x H x W float32, spacing in mm)."""
    scan = load_scan(path)
    return scan.hu, scan.spacing


def load_scan(path: str | PathLike) -> Scan:
    """Read one scan in HU with its geometry: a DICOM series folder (or a folder of several series, such
    as a CQ500 scan folder: its series is chosen by `pick_series`), a `.dcm` file, or a NIfTI file."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return read_dicom_scan(find_series(path))
    if not path.exists():
        raise InputError(path, "does not exist")
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti_scan(path)[0]
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom_scan(path)
    if name.endswith(".npy"):
        raise InputError(path, ".npy volumes hold normalised values, not HU; use load_and_preprocess")
    raise InputError(path, "unknown volume format (expected a DICOM folder, .dcm, .nii, .nii.gz or .npy)")
