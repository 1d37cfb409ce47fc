"""Readers for the brain-CT label files: CQ500 `reads.csv` and the PhysioNet CT-ICH CSVs.

Both readers accept a UTF-8 byte-order mark, CRLF line endings and a missing final newline, skip blank
lines, and raise `InputError` (file + problem, with the line number where one applies) for a missing
column, a duplicate scan, a short row or a value other than 0/1. Formats: shared/FORMATS.md.
"""

from __future__ import annotations

import csv
import io
from os import PathLike
from pathlib import Path

from m3d_lit.errors import InputError

__all__ = [
    "CQ500_FINDINGS",
    "CQ500_READERS",
    "PHYSIONET_TYPES",
    "read_cq500_reads",
    "read_physionet_labels",
]

CQ500_FINDINGS = (
    "ICH",
    "IPH",
    "IVH",
    "SDH",
    "EDH",
    "SAH",
    "BleedLocation-Left",
    "BleedLocation-Right",
    "ChronicBleed",
    "Fracture",
    "CalvarialFracture",
    "OtherFracture",
    "MassEffect",
    "MidlineShift",
)
CQ500_READERS = ("R1", "R2", "R3")
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

Rows = list[tuple[int, list[str]]]


def _read_table(path: Path) -> tuple[list[str], Rows]:
    """Header cells and (line number, cells) of the non-blank rows; quoted newlines stay in their cell."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Spreadsheet exports are often cp1252; only free-text columns (notes) can hold such bytes.
        text = raw.decode("latin-1")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: Rows = []
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                rows.append((reader.line_num, cells))
    except csv.Error as exc:
        raise InputError(path, f"line {reader.line_num}: malformed CSV ({exc})") from None
    if not rows:
        raise InputError(path, "file is empty")
    (_, header), body = rows[0], rows[1:]
    return [" ".join(cell.split()) for cell in header], body


def _column_index(path: Path, header: list[str], required: list[str]) -> dict[str, int]:
    seen: dict[str, int] = {}
    for i, name in enumerate(header):
        if name and name in seen and name in required:
            raise InputError(path, f"column {name!r} appears twice in the header")
        seen.setdefault(name, i)
    missing = [name for name in required if name not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise InputError(path, f"missing column(s) {shown}")
    return {name: seen[name] for name in required}


def _check_width(path: Path, line: int, cells: list[str], width: int) -> list[str]:
    if len(cells) < width:
        raise InputError(path, f"line {line}: {len(cells)} values, the header has {width}")
    if any(cell.strip() for cell in cells[width:]):
        raise InputError(path, f"line {line}: {len(cells)} values, the header has {width}")
    return cells


def _binary(path: Path, line: int, column: str, value: str) -> int:
    value = value.strip()
    if value not in ("0", "1"):
        raise InputError(path, f"line {line}, column {column}: value {value!r} is not 0 or 1")
    return int(value)


def read_cq500_reads(path: str | PathLike) -> dict[str, dict]:
    """Read CQ500 `reads.csv`.

    Args:
        path: the `reads.csv` file (columns `name`, `Category`, `R1:ICH` ... `R3:MidlineShift`).

    Returns:
        scan name -> {"category": str, "readers": {"R1": {finding: 0/1}, ...}, "majority": {finding: 0/1}};
        a finding is majority-positive when more than half of the readers marked it.
    """
    path = Path(path)
    header, rows = _read_table(path)
    votes = [f"{r}:{f}" for r in CQ500_READERS for f in CQ500_FINDINGS]
    col = _column_index(path, header, ["name", "Category", *votes])
    if not rows:
        raise InputError(path, "no scans below the header")
    out: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for line, cells in rows:
        cells = _check_width(path, line, cells, len(header))
        name = cells[col["name"]].strip()
        if not name:
            raise InputError(path, f"line {line}: empty scan name")
        if name in out:
            raise InputError(
                path, f"line {line}: duplicate scan name {name} (first on line {first_line[name]})"
            )
        readers = {
            r: {f: _binary(path, line, f"{r}:{f}", cells[col[f"{r}:{f}"]]) for f in CQ500_FINDINGS}
            for r in CQ500_READERS
        }
        majority = {
            f: int(2 * sum(readers[r][f] for r in CQ500_READERS) > len(CQ500_READERS)) for f in CQ500_FINDINGS
        }
        out[name] = {"category": cells[col["Category"]].strip(), "readers": readers, "majority": majority}
        first_line[name] = line
    return out


def _patient_id(path: Path, line: int, value: str) -> str:
    value = value.strip()
    if not value.isdigit():
        raise InputError(path, f"line {line}: patient number {value!r} is not a whole number")
    return f"{int(value):03d}"


def _read_slices(path: Path) -> dict[str, dict[int, dict[str, int]]]:
    header, rows = _read_table(path)
    columns = {**PHYSIONET_TYPES, "hemorrhage": "No_Hemorrhage", "fracture": "Fracture_Yes_No"}
    col = _column_index(path, header, ["PatientNumber", "SliceNumber", *columns.values()])
    slices: dict[str, dict[int, dict[str, int]]] = {}
    for line, cells in rows:
        cells = _check_width(path, line, cells, len(header))
        pid = _patient_id(path, line, cells[col["PatientNumber"]])
        number = cells[col["SliceNumber"]].strip()
        if not number.isdigit() or int(number) < 1:
            raise InputError(path, f"line {line}: slice number {number!r} is not a whole number >= 1")
        values = {key: _binary(path, line, name, cells[col[name]]) for key, name in columns.items()}
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
    header, rows = _read_table(path)
    header, rows = _demographics_header(header, rows)
    fracture = next((name for name in header if name.lower().startswith("fracture")), "Fracture (yes 1/no 0)")
    columns = {**PHYSIONET_TYPES, "fracture": fracture}
    col = _column_index(path, header, ["Patient Number", *columns.values()])
    out: dict[str, dict[str, int | None]] = {}
    for line, cells in rows:
        cells = cells + [""] * max(0, len(header) - len(cells))
        pid = _patient_id(path, line, cells[col["Patient Number"]])
        if pid in out:
            raise InputError(path, f"line {line}: duplicate patient number {pid}")
        out[pid] = {
            key: _binary(path, line, name, cells[col[name]]) if cells[col[name]].strip() else None
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
