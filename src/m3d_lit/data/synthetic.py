"""`m3d-lit synth`: synthetic CQ500 (DICOM + reads.csv) and PhysioNet CT-ICH (NIfTI + CSVs) datasets.

Both are written in the on-disk formats of the real downloads (shared/FORMATS.md), so the demo, the
tests and real users go through the same readers. Each dataset folder is built under a temporary name
and renamed when complete; a folder this command did not make is never overwritten.
With `--m3d-data N` it also writes `OUT/M3D-Data` in the M3D-Data formats (`m3d_lit.data.synthetic_m3d`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from m3d_lit.arguments import CommandParser
from m3d_lit.data.phantom import (
    BLEED_TYPES,
    FIELD_OF_VIEW_MM,
    HEAD_HEIGHT_MM,
    Phantom,
    draw_findings,
    render_phantom,
)
from m3d_lit.data.synthetic_m3d import write_m3d_data
from m3d_lit.errors import InputError

__all__ = [
    "CQ500_COLUMNS",
    "draw_findings",
    "main",
    "physionet_numbers",
    "scan_phantom",
    "write_cq500",
    "write_ct_series",
    "write_physionet",
]

CQ500_FINDINGS = (
    "ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
    "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift",
)  # fmt: skip
CQ500_COLUMNS = ("name", "Category") + tuple(f"R{r}:{f}" for r in (1, 2, 3) for f in CQ500_FINDINGS)
PHYSIONET_COLUMNS = {"IVH": "Intraventricular", "IPH": "Intraparenchymal", "SAH": "Subarachnoid",
                     "EDH": "Epidural", "SDH": "Subdural"}  # fmt: skip
MARKER = "synth.json"
DATASET_CODES = {"cq500": 0, "physionet": 1}

_PRIMARY_SERIES = ("CT Plain", "CT PRE CONTRAST 5MM STD", "CT 55mm Plain", "CT 5mm", "CT Plain 3mm")
_SECOND_SERIES = ("CT POST CONTRAST", "CT Thin Bone", "CT 0.625mm")
_DISAGREE = 0.05  # per scan and finding: one reader of three votes against the truth


def scan_phantom(
    dataset: str, index: int, shape: tuple[int, int, int], seed: int, balanced: bool = False
) -> tuple[Phantom, np.random.Generator]:
    """The phantom of scan `index` (0-based) of a dataset, and its generator for the rest of the scan.

    Each scan has its own generator, so a scan does not depend on how many others are made.
    """
    rng = np.random.default_rng([seed, DATASET_CODES[dataset], index])
    return render_phantom(shape, draw_findings(rng, "balanced" if balanced else dataset), rng), rng


def _spacing(shape: tuple[int, int, int]) -> tuple[float, float, float]:
    d, h, w = shape
    return HEAD_HEIGHT_MM / d, FIELD_OF_VIEW_MM / h, FIELD_OF_VIEW_MM / w


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _ct_dataset(hu_shape: tuple[int, int], spacing: tuple, name: str, ident: dict, contrast: bool) -> Dataset:
    """The header shared by every slice of a series, with fake identifying fields so that tests can check
    none of them leaks into outputs."""
    n, seed = ident["n"], ident["seed"]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality, ds.ImageType = CTImageStorage, "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName, ds.PatientID = f"SYNTH^PATIENT{n}", f"SYNTHID{n:05d}"
    ds.PatientBirthDate, ds.PatientSex = f"19{40 + n % 50:02d}0101", "O"
    ds.InstitutionName, ds.AccessionNumber = "SYNTH GENERAL HOSPITAL", f"SYNACC{n:05d}"
    ds.StudyDate, ds.StudyTime = "20100101", "120000"
    ds.StudyInstanceUID = _uid(seed, n, "study")
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = _uid(seed, n, name), _uid(seed, n, "frame")
    ds.SeriesDescription, ds.SeriesNumber = name, 2 + len(name) % 7
    if contrast:
        ds.ContrastBolusAgent = "IODINE"
    dz, dy, dx = spacing
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # columns -> patient left, rows -> posterior
    ds.PixelSpacing, ds.SliceThickness = [round(dy, 6), round(dx, 6)], round(dz, 6)
    ds.Rows, ds.Columns = hu_shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = ident["intercept"], 1.0, "HU"
    ds.WindowCenter, ds.WindowWidth, ds.KVP = 40, 80, 120
    return ds


def write_ct_series(
    folder: Path, hu: np.ndarray, spacing: tuple, name: str, ident: dict, contrast: bool = False
) -> None:
    """Write a D x H x W HU volume (canonical orientation) as CT slices CT000000.dcm, ...

    Args:
        folder: the series folder (created).
        hu: int16 volume, axis 0 inferior -> superior.
        spacing: (slice spacing, row spacing, column spacing) in mm.
        name: the series description (also the folder name in CQ500).
        ident: {"n": scan number, "seed": seed, "intercept": RescaleIntercept}.
        contrast: mark the series as contrast-enhanced.
    """
    folder.mkdir(parents=True)
    ds = _ct_dataset(hu.shape[1:], spacing, name, ident, contrast)
    dz, dy, dx = spacing
    stored = np.clip(hu.astype(np.int32) - int(ident["intercept"]), 0, 4095).astype(np.uint16)
    depth = hu.shape[0]
    # Files are numbered from the top of the head down, so readers must sort by position, not name.
    for i in range(depth):
        k = depth - 1 - i
        uid = _uid(ident["seed"], ident["n"], name, k)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        x0, y0 = -FIELD_OF_VIEW_MM / 2 + dx / 2, -FIELD_OF_VIEW_MM / 2 + dy / 2
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(-HEAD_HEIGHT_MM / 2 + k * dz, 4)]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"CT{i:06d}.dcm", enforce_file_format=True)


def _reads_row(name: str, truth: dict[str, int], rng: np.random.Generator) -> list[str]:
    votes = np.array([[truth[f] for f in CQ500_FINDINGS]] * 3)
    for j in range(len(CQ500_FINDINGS)):
        if rng.random() < _DISAGREE:
            r = rng.integers(3)
            votes[r, j] = 1 - votes[r, j]
    return [name, str(rng.choice(("B1", "B2")))] + [str(v) for v in votes.reshape(-1)]


def _csv_text(rows: list[list[str]], newline: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator=newline).writerows(rows)
    return buf.getvalue()


def write_cq500(out: Path, count: int, shape: tuple[int, int, int], seed: int, balanced: bool) -> None:
    """Write `count` CQ500-style scans and `reads.csv` into the folder `out`.

    Args:
        out: the dataset folder (created).
        count: number of scans, named CQ500-CT-0 .. CQ500-CT-<count-1>.
        shape: (D, H, W) of each primary series.
        seed: base seed.
        balanced: each finding in about half of the scans instead of the real frequencies.
    """
    rows = [list(CQ500_COLUMNS)]
    for n in range(count):
        phantom, rng = scan_phantom("cq500", n, shape, seed, balanced)
        # Zip downloads unpack as "CQ500CT<n> CQ500CT<n>"; both namings occur in the wild.
        folder = f"CQ500CT{n} CQ500CT{n}" if n % 4 == 3 else f"CQ500-CT-{n}"
        study = out / folder / "Unknown Study"
        ident = {"n": n, "seed": seed, "intercept": float(rng.choice((-1024.0, -1000.0)))}
        primary = str(rng.choice(_PRIMARY_SERIES))
        write_ct_series(study / primary, phantom.hu, _spacing(shape), primary, ident)
        if rng.random() < 0.35:
            _write_second_series(study, phantom, shape, ident, rng)
        rows.append(_reads_row(f"CQ500-CT-{n}", phantom.truth, rng))
    # The real reads.csv has no final newline.
    (out / "reads.csv").write_text(_csv_text(rows, "\n").rstrip("\n"), newline="")


def _write_second_series(
    study: Path, phantom: Phantom, shape: tuple, ident: dict, rng: np.random.Generator
) -> None:
    name = str(rng.choice(_SECOND_SERIES))
    dz, dy, dx = _spacing(shape)
    if name == "CT POST CONTRAST":
        hu = phantom.hu + (phantom.hu > 0) * np.int16(12)
        write_ct_series(study / name, hu, (dz, dy, dx), name, ident, contrast=True)
    else:
        # A thinner reconstruction of the same scan: twice the slices at half the spacing.
        write_ct_series(study / name, np.repeat(phantom.hu, 2, axis=0), (dz / 2, dy, dx), name, ident)


def _nifti(volume: np.ndarray, spacing: tuple[float, float, float]) -> nib.Nifti1Image:
    """Store D x H x W (inferior->superior, anterior->posterior, right->left) as i=W, j=H, k=D.

    That is the LPS-like layout of many DICOM converters, so readers must reorient it.
    """
    dz, dy, dx = spacing
    affine = np.diag([-dx, -dy, dz, 1.0])
    affine[:3, 3] = (FIELD_OF_VIEW_MM / 2, FIELD_OF_VIEW_MM / 2, -HEAD_HEIGHT_MM / 2)
    img = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    return img


def _slice_rows(pid: int, phantom: Phantom) -> list[list[str]]:
    rows = []
    for k in range(phantom.hu.shape[0]):
        present = {t: int((phantom.bleeds[k] == c).any()) for c, t in enumerate(BLEED_TYPES, start=1)}
        cells = [present[t] for t in PHYSIONET_COLUMNS]
        cells += [int(not any(cells)), int(phantom.fracture[k].any())]
        rows.append([str(pid), str(k + 1)] + [str(c) for c in cells])
    return rows


def _demographics(entries: list[tuple[int, dict, np.random.Generator]]) -> str:
    head = [
        "Patient Number",
        "Age\n(years)",
        "Gender",
        "Hemorrhage type based on the radiologists diagnosis ",
    ]
    rows = [head + ["", "", "", "", "Fracture (yes 1/no 0)", "Condition on file", "Note"]]
    rows.append(["", "", ""] + list(PHYSIONET_COLUMNS.values()) + ["", "", ""])
    for pid, truth, rng in entries:
        types = [str(truth[t]) for t in PHYSIONET_COLUMNS]
        age, gender = str(int(rng.integers(1, 73))), str(rng.choice(("Male", "Female")))
        rows.append([str(pid), age, gender, *types, str(truth["Fracture"]), "", ""])
    return _csv_text(rows, "\r\n")


def physionet_numbers(count: int) -> list[int]:
    """Patient numbers from 49 upward, without 59-65 (absent in the real dataset)."""
    return [n for n in range(49, 49 + count + 7) if not 59 <= n <= 65][:count]


def write_physionet(out: Path, count: int, shape: tuple[int, int, int], seed: int, balanced: bool) -> None:
    """Write `count` PhysioNet-style patients: ct_scans/, masks/ and the two label CSVs, into `out`.

    Args: as `write_cq500`; patients are numbered 049, 050, ... (059-065 skipped).
    """
    (out / "ct_scans").mkdir(parents=True)
    (out / "masks").mkdir()
    slice_rows = [
        ["PatientNumber", "SliceNumber", *PHYSIONET_COLUMNS.values(), "No_Hemorrhage", "Fracture_Yes_No"]
    ]
    entries = []
    for i, pid in enumerate(physionet_numbers(count)):
        phantom, rng = scan_phantom("physionet", i, shape, seed, balanced)
        nib.save(_nifti(phantom.hu, _spacing(shape)), out / "ct_scans" / f"{pid:03d}.nii")
        mask = (phantom.bleeds > 0).astype(np.uint8)
        nib.save(_nifti(mask, _spacing(shape)), out / "masks" / f"{pid:03d}.nii")
        slice_rows += _slice_rows(pid, phantom)
        entries.append((pid, phantom.truth, rng))
    (out / "hemorrhage_diagnosis_raw_ct.csv").write_text(_csv_text(slice_rows, "\r\n"), newline="")
    (out / "Patient_demographics.csv").write_text(_demographics(entries), newline="")


def _build(target: Path, writer, count: int, shape: tuple[int, int, int], seed: int, balanced: bool) -> None:
    """Build into a temporary sibling folder and rename it into place when complete."""
    settings = {"count": count, "shape": list(shape), "seed": seed, "balanced": balanced}
    if target.exists():
        marker = target / MARKER
        if not marker.exists():
            raise InputError(target, "exists and was not made by `m3d-lit synth`; choose another --out")
        if json.loads(marker.read_text()) == settings:
            return
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer(tmp, count, shape, seed, balanced)
    (tmp / MARKER).write_text(json.dumps(settings) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="m3d-lit synth", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for cq500/, physionet/ and M3D-Data/")
    ap.add_argument("--cq500", type=int, default=64, help="number of CQ500 scans (0 = none)")
    ap.add_argument("--physionet", type=int, default=64, help="number of PhysioNet patients (0 = none)")
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128), metavar=("D", "H", "W"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--balanced", action="store_true", help="each finding in about half of the scans")
    ap.add_argument(
        "--m3d-data", type=int, default=0, metavar="N",
        help="also write M3D-Data (M3D-Cap, M3D-VQA, M3D-Seg) of N scans each into OUT/M3D-Data (0 = none)",
    )  # fmt: skip
    ap.add_argument("--m3d-shape", type=int, nargs=3, default=(32, 256, 256), metavar=("D", "H", "W"),
                    help="volume size of the M3D-Data images (the paper's 32 256 256 by default)")  # fmt: skip
    return ap


def main(argv: list[str]) -> int:
    """Entry point of `m3d-lit synth`."""
    args = _parser().parse_args(argv)
    shape = tuple(args.shape)
    if min(shape) < 8 or shape[1] != shape[2]:
        raise InputError("--shape", f"{shape}: need D, H, W >= 8 and H == W")
    if args.cq500 < 0 or args.physionet < 0:
        raise InputError("--cq500/--physionet", f"{args.cq500} and {args.physionet} must be >= 0")
    m3d_shape = tuple(args.m3d_shape)
    if args.m3d_data and (args.m3d_data < 3 or min(m3d_shape) < 8 or m3d_shape[1] != m3d_shape[2]):
        raise InputError(
            "--m3d-data/--m3d-shape", f"{args.m3d_data} and {m3d_shape}: need N >= 3, D, H, W >= 8, H == W"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for name, writer, count in (
        ("cq500", write_cq500, args.cq500),
        ("physionet", write_physionet, args.physionet),
    ):
        if count:
            _build(args.out / name, writer, count, shape, args.seed, args.balanced)
            print(f"m3d-lit synth: {count} {name} scans in {args.out / name}")
    if args.m3d_data:
        _build(args.out / "M3D-Data", write_m3d_data, args.m3d_data, m3d_shape, args.seed, args.balanced)
        print(f"m3d-lit synth: M3D-Data of {args.m3d_data} scans each in {args.out / 'M3D-Data'}")
    return 0
