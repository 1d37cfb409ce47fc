"""PhysioNet CT-ICH: `ct_scans/<n>.nii` with `masks/<n>.nii`, a per-slice label CSV and demographics.

Patients are numbered (`049`); patient-level labels are "any slice", overridden by a non-blank cell of
`Patient_demographics.csv`. Questions: an open hemorrhage question, a closed fracture question and (with
`seg`) a segmentation sample per patient. Where to get CT-ICH and its layout: the README's "Public
datasets".
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.data import phrasing
from m3d_lit.data.geometry import Scan
from m3d_lit.data.io import read_nifti_scan
from m3d_lit.data.labels import Rows, binary, check_width, column_index, read_table
from m3d_lit.data.sources.base import ScanRef, Skipped, Source, qa_sample, relative, safe_id
from m3d_lit.data.sources.references import HSSAYENI_2020, SEED_STUDY, Reference
from m3d_lit.errors import InputError

__all__ = [
    "DEMOGRAPHICS_FILE",
    "PHYSIONET_TYPES",
    "SLICE_FILE",
    "SOURCE",
    "build_physionet_samples",
    "physionet_findings",
    "read_physionet_labels",
]

# Short name -> column name in the PhysioNet per-slice CSV and the demographics sub-header.
PHYSIONET_TYPES = {
    "IVH": "Intraventricular",
    "IPH": "Intraparenchymal",
    "SAH": "Subarachnoid",
    "EDH": "Epidural",
    "SDH": "Subdural",
}
SLICE_FILE = "hemorrhage_diagnosis_raw_ct.csv"
DEMOGRAPHICS_FILE = "Patient_demographics.csv"


# ---------------------------------------------------------------- label CSVs


def _patient_id(path: Path, line: int, value: str) -> str:
    value = value.strip()
    if not value.isdigit():
        raise InputError(path, f"line {line}: patient number {value!r} is not a whole number")
    return f"{int(value):03d}"


def _read_slices(path: Path) -> dict[str, dict[int, dict[str, int]]]:
    header, rows = read_table(path)
    columns = {**PHYSIONET_TYPES, "hemorrhage": "No_Hemorrhage", "fracture": "Fracture_Yes_No"}
    col = column_index(path, header, ["PatientNumber", "SliceNumber", *columns.values()])
    slices: dict[str, dict[int, dict[str, int]]] = {}
    for line, cells in rows:
        cells = check_width(path, line, cells, len(header))
        pid = _patient_id(path, line, cells[col["PatientNumber"]])
        number = cells[col["SliceNumber"]].strip()
        if not number.isdigit() or int(number) < 1:
            raise InputError(path, f"line {line}: slice number {number!r} is not a whole number >= 1")
        values = {key: binary(path, line, name, cells[col[name]]) for key, name in columns.items()}
        values["hemorrhage"] = 1 - values["hemorrhage"]
        if values["hemorrhage"] != max(values[k] for k in PHYSIONET_TYPES):
            raise InputError(path, f"line {line}: No_Hemorrhage contradicts the hemorrhage type columns")
        if int(number) in slices.setdefault(pid, {}):
            raise InputError(path, f"line {line}: patient {pid} slice {int(number)} appears twice")
        slices[pid][int(number)] = values
    return slices


def _patient_record(path: Path, pid: str, slices: dict[int, dict[str, int]]) -> dict:
    missing = sorted(set(range(1, len(slices) + 1)) - set(slices))
    if missing:
        raise InputError(path, f"patient {pid}: slice numbers are not 1..N, missing {missing[:5]}")
    ordered = {n: slices[n] for n in sorted(slices)}
    types = {k: max(s[k] for s in ordered.values()) for k in PHYSIONET_TYPES}
    return {
        "types": types,
        "hemorrhage": max(types.values()),
        "fracture": max(s["fracture"] for s in ordered.values()),
        "num_slices": len(ordered),
        "slices": ordered,
    }


def _demographics_header(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
    """Merge the two-row header (a merged cell over the five hemorrhage types) into one name per column."""
    if all(name in header for name in PHYSIONET_TYPES.values()) or not rows:
        return header, rows
    (_, sub), body = rows[0], rows[1:]
    width = max(len(header), len(sub))
    header = header + [""] * (width - len(header))
    sub = [" ".join(cell.split()) for cell in sub] + [""] * (width - len(sub))
    return [s or h for h, s in zip(header, sub)], body


def _read_demographics(path: Path) -> dict[str, dict[str, int | None]]:
    """Patient id -> {IVH.., fracture: 0/1, or None where the cell is blank}."""
    header, rows = read_table(path)
    header, rows = _demographics_header(header, rows)
    fracture = next((name for name in header if name.lower().startswith("fracture")), "Fracture (yes 1/no 0)")
    columns = {**PHYSIONET_TYPES, "fracture": fracture}
    col = column_index(path, header, ["Patient Number", *columns.values()])
    out: dict[str, dict[str, int | None]] = {}
    for line, cells in rows:
        cells = cells + [""] * max(0, len(header) - len(cells))
        pid = _patient_id(path, line, cells[col["Patient Number"]])
        if pid in out:
            raise InputError(path, f"line {line}: duplicate patient number {pid}")
        out[pid] = {
            key: binary(path, line, name, cells[col[name]]) if cells[col[name]].strip() else None
            for key, name in columns.items()
        }
    return out


def read_physionet_labels(root: str | PathLike) -> dict[str, dict]:
    """Read the PhysioNet CT-ICH labels of the patients in the per-slice CSV.

    Args:
        root: folder holding `hemorrhage_diagnosis_raw_ct.csv` and, optionally, `Patient_demographics.csv`.

    Returns:
        patient id ("049") -> {"types": {IVH, IPH, SAH, EDH, SDH: 0/1}, "hemorrhage": 0/1, "fracture": 0/1,
        "num_slices": int, "slices": {1-based slice: {IVH.., "hemorrhage", "fracture"}}}. Patient-level
        labels are "any slice"; a non-blank demographics cell overrides them. Demographics rows of
        patients absent from the per-slice CSV (no CT in the dataset) are not returned.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected the PhysioNet CT-ICH label CSVs in it)")
    slice_file = root / SLICE_FILE
    records = {
        pid: _patient_record(slice_file, pid, s) for pid, s in sorted(_read_slices(slice_file).items())
    }
    demographics_file = root / DEMOGRAPHICS_FILE
    if demographics_file.exists():
        for pid, cells in _read_demographics(demographics_file).items():
            if pid not in records:
                continue
            record = records[pid]
            for key in PHYSIONET_TYPES:
                if cells[key] is not None:
                    record["types"][key] = cells[key]
            if cells["fracture"] is not None:
                record["fracture"] = cells["fracture"]
            record["hemorrhage"] = max(record["types"].values())
    return records


# ---------------------------------------------------------------- questions


def physionet_findings(record: Mapping) -> dict[str, int]:
    """A `read_physionet_labels` record in CQ500 finding names (no side, chronicity or mass effect)."""
    return {"ICH": record["hemorrhage"], **record["types"], "Fracture": record["fracture"]}


def build_physionet_samples(
    pid: str, record: Mapping, rng: random.Random | None = None, seg: bool = True
) -> list[dict]:
    """An open hemorrhage question, a closed fracture question and (with `seg`) a segmentation sample.

    The first two are the paper's QA records for a PhysioNet patient; the segmentation sample trains the
    `[SEG]` path (stage 3) and is scored on its own (Dice), never with the text metrics.

    Args:
        pid: the 3-digit patient id, e.g. "049" (also the image and mask file stem).
        record: a `read_physionet_labels` record.
        rng: picks the paraphrases (training); None gives the canonical wording.
        seg: add the segmentation sample.
    """
    findings = physionet_findings(record)
    hemorrhage = {k: findings[k] for k in ("ICH", *phrasing.HEMORRHAGE_TYPES)}
    open_qa = (phrasing.open_question(False, rng), phrasing.open_answer(findings, rng))
    fracture_qa = (
        phrasing.closed_question("Fracture", rng),
        phrasing.closed_answer("Fracture", findings["Fracture"], rng),
    )
    samples = [
        qa_sample("physionet", pid, "hemorrhage", "open", *open_qa, hemorrhage),
        qa_sample("physionet", pid, "Fracture", "closed", *fracture_qa, {"Fracture": findings["Fracture"]}),
    ]
    if not seg:
        return samples
    seg_qa = (phrasing.seg_question(rng), phrasing.seg_answer(findings["ICH"], rng))
    segment = qa_sample("physionet", pid, "segment", "seg", *seg_qa, {"ICH": findings["ICH"]})
    # Negatives carry their (empty) mask too, so training also learns to predict nothing.
    segment["mask"] = f"masks/{pid}.npy"
    return samples + [segment]


class PhysioNetSource(Source):
    """PhysioNet CT-ICH (see the module docstring)."""

    name = "physionet"
    display_name = "PhysioNet"
    qa_reference = Reference(
        SEED_STUDY,
        "Table 1",
        "LoRA-fine-tuned M3D-LaMed answering the PhysioNet CT-ICH questions",
        {
            "bleu1": 0.3958,
            "bleu2": 0.1064,
            "bleu3": 0.0435,
            "bleu4": 0.0222,
            "rouge": 0.2574,
            "meteor": 0.2141,
        },
    )
    table1_records = "per PhysioNet patient the open question and the fracture question"
    seg_reference = Reference(
        HSSAYENI_2020,
        "the abstract",
        "Dice of their U-Net segmenting any hemorrhage on PhysioNet CT-ICH (5-fold cross-validation)",
        {"dice": 0.31},
    )
    hemorrhage_question = True

    def writes_masks(self, options: Mapping[str, Any]) -> bool:
        return True

    def list_scans(self, root: Path, options: Mapping[str, Any]) -> tuple[list[ScanRef], list[Skipped]]:
        scans = root / "ct_scans"
        if not scans.is_dir():
            raise InputError(root, "no ct_scans/ folder (expected the PhysioNet CT-ICH layout)")
        refs, skipped = [], []
        for image in sorted(scans.iterdir()):
            stem = re.sub(r"\.nii(\.gz)?$", "", image.name, flags=re.IGNORECASE)
            if stem == image.name or image.name.startswith("."):
                continue
            sid = f"{int(stem):03d}" if stem.isdigit() else stem
            masks = [
                root / "masks" / image.name,
                root / "masks" / f"{stem}.nii",
                root / "masks" / f"{stem}.nii.gz",
            ]
            mask = next((m for m in masks if m.is_file()), None)
            try:
                safe_id(sid, image)
                if mask is None:
                    raise InputError(masks[0], f"no mask for {image.name} in masks/")
            except InputError as e:
                skipped.append((sid, relative(Path(e.path), root), e.problem))
                continue
            refs.append(ScanRef(sid, image, mask))
        if not refs and not skipped:
            raise InputError(scans, "no .nii or .nii.gz files in it")
        return refs, skipped

    def read_scan(self, ref: ScanRef) -> tuple[Scan, np.ndarray | None, Path]:
        scan, mask = read_nifti_scan(ref.image, ref.mask)
        return scan, mask, ref.image

    def load_labels(self, root: Path, options: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
        return root, read_physionet_labels(root)

    def match_prepared(self, root: Path, out_dir: Path, records: Mapping[str, Any]) -> None:
        """The per-slice CSV must label exactly the slices of each prepared NIfTI (`prepare`'s manifest)."""
        label_path, manifest = root / SLICE_FILE, out_dir / "manifest.csv"
        if not manifest.is_file():
            return
        with manifest.open(newline="", encoding="utf-8") as handle:
            depth = {row["id"]: int(row["orig_shape"].split("x")[0]) for row in csv.DictReader(handle)}
        for pid, record in records.items():
            if pid in depth and record["num_slices"] != depth[pid]:
                raise InputError(
                    label_path,
                    f"patient {pid}: {record['num_slices']} slices labelled, the NIfTI has {depth[pid]}",
                )

    def stratify_value(self, record: Any) -> int:
        return physionet_findings(record)["ICH"]

    def build_samples(
        self, sid: str, record: Any, rng: random.Random | None = None, seg: bool = True
    ) -> list[dict]:
        return build_physionet_samples(sid, record, rng, seg=seg)

    def report_text(self, record: Any, rng: random.Random | None = None) -> str:
        return phrasing.findings_report(physionet_findings(record), rng)


SOURCE = PhysioNetSource()
