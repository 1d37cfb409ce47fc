"""Scans for `m3d-lit app`: an upload (NIfTI, zip of a DICOM series, `.npy`) or a prepared test scan.

Every scan is shown on the grid the model sees (cropped to the head and resized to the checkpoint's
size), so the predicted and reference masks lie on the displayed voxels exactly. An upload read as HU
keeps its HU on that grid for the window presets; a `.npy` or a prepared scan holds values already
windowed to [0, 1] and is shown as it is.
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3d_lit.data.datasets import load_prepared_volume, read_qa_jsonl
from m3d_lit.data.geometry import Scan as RawScan
from m3d_lit.data.geometry import ScanGeometry
from m3d_lit.data.io import load_scan, read_npy
from m3d_lit.data.preprocess import preprocess_with_box, resize
from m3d_lit.errors import InputError

__all__ = ["PreparedQuestion", "PreparedScan", "Scan", "find_prepared", "load_prepared", "load_upload"]

MAX_ZIP_BYTES = 4 << 30  # a head CT series is well under 1 GiB; this bounds what an upload may unpack to


@dataclass(frozen=True)
class PreparedQuestion:
    """One line of a prepared QA file: the question, the reference answer, its kind, its mask file."""

    question: str
    answer: str
    kind: str
    mask: Path | None


@dataclass
class PreparedScan:
    """A prepared scan before loading: its volume file and its questions."""

    image: Path
    questions: list[PreparedQuestion] = field(default_factory=list)


@dataclass(eq=False)
class Scan:
    """One scan of a session.

    Args:
        name: what the page calls it.
        image: float32 1 x D x H x W in [0, 1], the model's input.
        display: float32 D x H x W on the same grid: HU when `hu` is set, else the values of `image`.
        hu: whether `display` holds Hounsfield units (the window presets apply).
        extent_mm: physical size (D, H, W) of the grid, or None when unknown (then shown as a cube).
        reference: uint8 D x H x W reference mask, or None.
        questions: the prepared questions of this scan (empty for an upload).
        geometry: what takes a mask on the model grid back to the uploaded NIfTI or DICOM series (its
            shape and affine); None for an `.npy` or a prepared scan, whose masks stay on the model grid.
    """

    name: str
    image: np.ndarray
    display: np.ndarray
    hu: bool
    extent_mm: tuple[float, float, float] | None = None
    reference: np.ndarray | None = None
    questions: list[PreparedQuestion] = field(default_factory=list)
    geometry: ScanGeometry | None = None


def _from_scan(scan: RawScan, size, window: str, source: str) -> Scan:
    """The model input of a scan read in HU, as `ask` makes it, with the geometry that inverts it."""
    hu = scan.hu
    image, _, box = preprocess_with_box(hu, None, size, window, source)
    extent = tuple(float(len(range(*b.indices(n)))) * s for b, n, s in zip(box, hu.shape, scan.spacing))
    geometry = ScanGeometry.build(scan.stored_shape, scan.affine, box, size)
    name = Path(source).name
    return Scan(name, image, resize(hu[box], size), True, extent, geometry=geometry)  # type: ignore[arg-type]


def _unzip(path: Path, name: str, into: Path) -> Path:
    """Unpack a zip upload into `into`, refusing members that would land outside it or a bomb."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise InputError(name, f"unpacks to more than {MAX_ZIP_BYTES >> 30} GiB")
            for member in members:
                target = (into / member.filename).resolve()
                if not target.is_relative_to(into.resolve()):
                    raise InputError(name, f"member {member.filename!r} points outside the archive")
            archive.extractall(into)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(name, f"not a readable zip file ({err})") from None
    return into


def load_upload(path: Path, name: str, size, window: str, workdir: Path) -> Scan:
    """Read an uploaded file as the command line reads `--volume`; errors name the file as uploaded.

    Args:
        path: where the upload lies.
        name: the file name the user chose (named in errors instead of `path`).
        size: the model's (D, H, W).
        window: the checkpoint's HU window.
        workdir: a folder for unpacking a zip (emptied again before returning).
    """
    lower = name.lower()
    if lower.endswith(".zip"):
        with tempfile.TemporaryDirectory(dir=workdir) as folder:
            try:
                scan = load_scan(_unzip(path, name, Path(folder)))
            except InputError as err:
                problem = err.problem.replace(str(Path(folder)), name)
                raise InputError(_inside(err.path, Path(folder), name), problem) from None
            return _from_scan(scan, size, window, name)
    try:
        if lower.endswith(".npy"):
            volume = read_npy(path)
            image = resize(volume, size)[None]
            return Scan(name, image, image[0], False)
        if lower.endswith((".nii", ".nii.gz")):
            return _from_scan(load_scan(path), size, window, name)
    except InputError as err:  # a reader's own message may quote the temporary path too
        raise InputError(name, err.problem.replace(str(path), name)) from None
    raise InputError(name, "unknown format (expected .nii, .nii.gz, .npy or a .zip of one DICOM series)")


def _inside(reported: str, folder: Path, name: str) -> str:
    """`scan.zip/series/CT1.dcm` for a file unpacked from the zip `name` into `folder`."""
    try:
        inner = Path(reported).resolve().relative_to(folder.resolve())
    except ValueError:
        return name
    return str(Path(name) / inner) if inner.parts else name


def find_prepared(folders: list[Path], split: str = "test") -> dict[str, PreparedScan]:
    """Scans of `qa_<split>.jsonl` in each `m3d-lit prepare` folder, by `dataset folder/image name`."""
    scans: dict[str, PreparedScan] = {}
    for folder in folders:
        qa = folder / f"qa_{split}.jsonl"
        if not qa.is_file():
            raise InputError(folder, f"has no qa_{split}.jsonl (not an `m3d-lit prepare` output folder)")
        for record in read_qa_jsonl(qa):
            entry = scans.setdefault(f"{folder.name}/{record.image.stem}", PreparedScan(record.image))
            entry.questions.append(
                PreparedQuestion(record.question[0], record.answer[0], record.kind, record.mask)
            )
    return scans


def load_prepared(key: str, entry: PreparedScan, size) -> Scan:
    """A prepared scan with the first non-empty reference mask among its lines."""
    image = load_prepared_volume(entry.image).numpy()
    if tuple(image.shape) != (1, *size):
        raise InputError(
            entry.image, f"volume of shape {tuple(image.shape)}, the checkpoint needs {(1, *size)}"
        )
    reference = None
    for line in entry.questions:
        if line.mask is not None:
            mask = (load_prepared_volume(line.mask).numpy()[0] > 0).astype(np.uint8)
            if mask.any():
                reference = mask
                break
    return Scan(key, image, image[0], False, None, reference, list(entry.questions))
