"""Synthetic raw datasets for `m3d-lit synth`: CQ500 (DICOM + reads.csv), PhysioNet CT-ICH (NIfTI + CSVs)
and an example of the folder source (the user's own scans: NIfTI and DICOM, labels.csv, findings.yaml,
masks).

All are written in the on-disk formats their readers expect (the README's "Public datasets" and "Your
own scans"), so the demo, the tests and real users go through the same readers. Each dataset folder is built
under a temporary name and renamed when complete (`build_dataset`); a folder this module did not make
is never overwritten. `m3d_lit.data.synthetic_m3d` writes M3D-Data.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from m3d_lit.data.geometry import CANONICAL_AXES
from m3d_lit.data.io import read_dicom_scan
from m3d_lit.data.phantom import (
    BLEED_TYPES,
    FIELD_OF_VIEW_MM,
    HEAD_HEIGHT_MM,
    RATES,
    Phantom,
    draw_findings,
    render_phantom,
)
from m3d_lit.errors import InputError

__all__ = [
    "CQ500_COLUMNS",
    "FOLDER_FINDINGS_YAML",
    "build_dataset",
    "draw_findings",
    "physionet_numbers",
    "scan_phantom",
    "write_cq500",
    "write_ct_series",
    "write_folder",
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
DATASET_CODES = {"cq500": 0, "physionet": 1, "folder": 3}  # 2: M3D-Data (synthetic_m3d)

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
    rates = dataset if dataset in RATES else "cq500"
    if balanced:  # each finding the dataset's labels name in about half of the scans
        rates = "balanced" if RATES[rates]["chronic"] else "balanced_acute"
    return render_phantom(shape, draw_findings(rng, rates), rng), rng


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


FOLDER_FINDINGS_YAML = """\
# The findings of labels.csv: each one's closed question and answers (see the README, "Your own scans").
open_question: Which findings does this scan show?
findings:
  hemorrhage:
    question: Is there an intracranial hemorrhage?
    yes: Yes, there is a hemorrhage.
    no: No, there is no hemorrhage.
  fracture:
    question: Is there a skull fracture?
    yes: Yes, there is a fracture.
    no: No, there is no fracture.
  mass_effect:
    question: Is there mass effect?
segment:
  question: Segment the hemorrhage.
  yes: It is [SEG].
  no: There is no hemorrhage to segment.
"""


def _stored_like(canonical: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A canonical D x H x W array laid out as the array whose voxel-to-RAS affine is `affine`."""
    back = orientations.ornt_transform(
        orientations.axcodes2ornt(CANONICAL_AXES), orientations.io_orientation(affine)
    )
    return np.ascontiguousarray(orientations.apply_orientation(canonical, back))


def write_folder(out: Path, count: int, shape: tuple[int, int, int], seed: int, balanced: bool) -> None:
    """Write an example of the folder source into `out`: scans/, masks/, labels.csv and findings.yaml.

    Scans `case000` ... are NIfTI (`.nii.gz`), every fourth a DICOM series folder `scans/<id>/`; each mask
    (any hemorrhage) lies on its scan's grid, the DICOM ones in the array layout and affine the DICOM
    reader gives. Args: as `write_cq500`.
    """
    (out / "scans").mkdir(parents=True)
    (out / "masks").mkdir()
    rows = [["id", "hemorrhage", "hemorrhage_side", "fracture", "mass_effect"]]
    for n in range(count):
        phantom, rng = scan_phantom("folder", n, shape, seed, balanced)
        sid, truth = f"case{n:03d}", phantom.truth
        mask = (phantom.bleeds > 0).astype(np.uint8)
        if n % 4 == 3:
            series = out / "scans" / sid
            ident = {"n": n, "seed": seed, "intercept": -1024.0}
            write_ct_series(series, phantom.hu, _spacing(shape), "CT Plain", ident)
            scan = read_dicom_scan(series)
            nib.save(
                nib.Nifti1Image(_stored_like(mask, scan.affine), scan.affine), out / "masks" / f"{sid}.nii.gz"
            )
        else:
            nib.save(_nifti(phantom.hu, _spacing(shape)), out / "scans" / f"{sid}.nii.gz")
            nib.save(_nifti(mask, _spacing(shape)), out / "masks" / f"{sid}.nii.gz")
        left, right = truth["BleedLocation-Left"], truth["BleedLocation-Right"]
        side = "both" if left and right else "left" if left else "right" if right else ""
        side = side if truth["ICH"] else ""
        rows.append([sid, str(truth["ICH"]), side, str(truth["Fracture"]), str(truth["MassEffect"])])
    (out / "labels.csv").write_text(_csv_text(rows, "\n"), newline="")
    (out / "findings.yaml").write_text(FOLDER_FINDINGS_YAML)


def build_dataset(
    target: Path, writer, count: int, shape: tuple[int, int, int], seed: int, balanced: bool
) -> bool:
    """Build into a temporary sibling folder and rename it into place when complete.

    Returns False when `target` already holds this very dataset (same settings), True when written.
    """
    settings = {"count": count, "shape": list(shape), "seed": seed, "balanced": balanced}
    if target.exists():
        marker = target / MARKER
        if not marker.exists():
            raise InputError(target, "exists and was not made by `m3d-lit synth`; choose another --out")
        if json.loads(marker.read_text()) == settings:
            return False
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer(tmp, count, shape, seed, balanced)
    (tmp / MARKER).write_text(json.dumps(settings) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return True
