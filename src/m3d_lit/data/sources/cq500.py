"""CQ500: one folder of DICOM series per scan, and the three readers' `reads.csv`.

Scan folders are `CQ500-CT-<n>` or the zip naming `CQ500CT<n> CQ500CT<n>`; each holds one or more series
(`choose_series` picks one, or `cq500_series_folders.txt` names it). Questions: one open hemorrhage
question (types and side) and five closed ones per scan, answered by the reader majority; `label.votes`
keeps each reader's vote. Where to get CQ500 and its layout: the README's "Public datasets".
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.data import phrasing
from m3d_lit.data.geometry import Scan
from m3d_lit.data.io import pick_series, read_dicom_scan
from m3d_lit.data.labels import binary, check_width, column_index, read_table
from m3d_lit.data.sources.base import ScanRef, Skipped, Source, qa_sample, scans_by_id
from m3d_lit.data.sources.references import CHILAMKURTHY_2018, SEED_STUDY, Reference
from m3d_lit.errors import InputError

__all__ = [
    "CQ500_FINDINGS",
    "CQ500_READERS",
    "OPEN_CQ500",
    "SOURCE",
    "build_cq500_samples",
    "choose_series",
    "cq500_findings",
    "cq500_scan_id",
    "find_cq500_scans",
    "load_series_list",
    "read_cq500_reads",
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
OPEN_CQ500 = ("ICH", *phrasing.HEMORRHAGE_TYPES, "BleedLocation-Left", "BleedLocation-Right")
_CQ500_NAME = re.compile(r"^CQ500-?CT-?(\d+)(?: CQ500-?CT-?(\d+))?$", re.IGNORECASE)


# ---------------------------------------------------------------- scan folders and series


def cq500_scan_id(folder_name: str) -> str | None:
    """`CQ500-CT-12` and the zip naming `CQ500CT12 CQ500CT12` both give `CQ500-CT-12`; else None."""
    m = _CQ500_NAME.match(folder_name.strip())
    if not m or (m.group(2) is not None and int(m.group(2)) != int(m.group(1))):
        return None
    return f"CQ500-CT-{int(m.group(1))}"


def find_cq500_scans(root: str | PathLike) -> dict[str, Path]:
    """Map scan id -> scan folder for every CQ500 scan folder directly under `root`."""
    return scans_by_id(root, lambda entry: cq500_scan_id(entry.name) if entry.is_dir() else None)


def choose_series(
    scan_dir: str | PathLike, override: Mapping[str, str] | None = None, target_mm: float = 5.0
) -> Path:
    """Pick the series of a CQ500 scan folder.

    Rule: a user-given series (`override`, scan id -> path relative to the scan folder) wins; otherwise
    `io.pick_series`: plain/non-contrast names first (then names saying nothing, then contrast or bone
    series), then slice thickness nearest `target_mm`, then the most slices, then the name.

    Args:
        scan_dir: the scan folder (`CQ500-CT-<n>` or `CQ500CT<n> CQ500CT<n>`).
        override: from `load_series_list`.
        target_mm: preferred slice thickness.
    """
    scan_dir = Path(scan_dir)
    sid = cq500_scan_id(scan_dir.name)
    if override and sid in override:
        chosen = scan_dir / override[sid]
        if not chosen.is_dir():
            raise InputError(chosen, f"series listed for {sid} in the series list does not exist")
        return chosen
    return pick_series(scan_dir, target_mm)


def load_series_list(path: str | PathLike) -> dict[str, str]:
    """Read a series list like `cq500_series_folders.txt`: lines `<scan folder>/<path of the series>`.

    Returns scan id -> series path relative to the scan folder.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read series list ({e})") from None
    out: dict[str, str] = {}
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        scan, _, rest = line.strip().strip("/").partition("/")
        sid = cq500_scan_id(scan)
        if sid is None or not rest or ".." in Path(rest).parts:
            raise InputError(path, f"line {i}: expected '<CQ500 scan folder>/<series path>', got {line!r}")
        out[sid] = rest
    return out


# ---------------------------------------------------------------- reads.csv


def read_cq500_reads(path: str | PathLike) -> dict[str, dict]:
    """Read CQ500 `reads.csv`.

    Args:
        path: the `reads.csv` file (columns `name`, `Category`, `R1:ICH` ... `R3:MidlineShift`).

    Returns:
        scan name -> {"category": str, "readers": {"R1": {finding: 0/1}, ...}, "majority": {finding: 0/1}};
        a finding is majority-positive when more than half of the readers marked it.
    """
    path = Path(path)
    header, rows = read_table(path)
    votes = [f"{r}:{f}" for r in CQ500_READERS for f in CQ500_FINDINGS]
    col = column_index(path, header, ["name", "Category", *votes])
    if not rows:
        raise InputError(path, "no scans below the header")
    out: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for line, cells in rows:
        cells = check_width(path, line, cells, len(header))
        name = cells[col["name"]].strip()
        if not name:
            raise InputError(path, f"line {line}: empty scan name")
        if name in out:
            raise InputError(
                path, f"line {line}: duplicate scan name {name} (first on line {first_line[name]})"
            )
        readers = {
            r: {f: binary(path, line, f"{r}:{f}", cells[col[f"{r}:{f}"]]) for f in CQ500_FINDINGS}
            for r in CQ500_READERS
        }
        majority = {
            f: int(2 * sum(readers[r][f] for r in CQ500_READERS) > len(CQ500_READERS)) for f in CQ500_FINDINGS
        }
        out[name] = {"category": cells[col["Category"]].strip(), "readers": readers, "majority": majority}
        first_line[name] = line
    return out


# ---------------------------------------------------------------- questions


def cq500_findings(record: Mapping) -> dict[str, int]:
    """The majority-of-readers findings of a `read_cq500_reads` record."""
    return dict(record["majority"])


def build_cq500_samples(name: str, record: Mapping, rng: random.Random | None = None) -> list[dict]:
    """One open hemorrhage question (types and side) and five closed questions for one CQ500 scan.

    Args:
        name: the scan name, e.g. "CQ500-CT-427" (also the patient and the image file stem).
        record: a `read_cq500_reads` record; answers use the reader majority, `label.votes` keeps each vote.
        rng: picks the paraphrases (training); None gives the canonical wording.
    """
    majority, readers = record["majority"], record["readers"]

    def label(keys: Sequence[str]) -> dict:
        votes = {r: {k: readers[r][k] for k in keys} for r in CQ500_READERS}
        return {**{k: majority[k] for k in keys}, "votes": votes}

    samples = [
        qa_sample(
            "cq500",
            name,
            "hemorrhage",
            "open",
            phrasing.open_question(True, rng),
            phrasing.open_answer(majority, rng),
            label(OPEN_CQ500),
        )
    ]
    for finding in phrasing.CLOSED_FINDINGS:
        question = phrasing.closed_question(finding, rng)
        answer = phrasing.closed_answer(finding, majority[finding], rng)
        samples.append(qa_sample("cq500", name, finding, "closed", question, answer, label([finding])))
    return samples


class CQ500Source(Source):
    """CQ500 (see the module docstring)."""

    name = "cq500"
    display_name = "CQ500"
    options = {
        "series_list": "file of '<scan>/<series path>' lines (default: each scan's plain series nearest 5 mm)"
    }
    qa_reference = Reference(
        SEED_STUDY,
        "Table 1",
        "LoRA-fine-tuned M3D-LaMed answering the CQ500 questions",
        {
            "bleu1": 0.5405,
            "bleu2": 0.3333,
            "bleu3": 0.2571,
            "bleu4": 0.2059,
            "rouge": 0.2975,
            "meteor": 0.1878,
        },
    )
    table1_records = "per CQ500 scan the open question and the five closed ones"
    finding_reference = Reference(
        CHILAMKURTHY_2018,
        "the abstract, rounded to two places there",
        "AUROC of their deep-learning algorithms on the 491 CQ500 scans against the radiologists' consensus",
        {
            "ICH": 0.94,
            "IPH": 0.95,
            "IVH": 0.93,
            "SDH": 0.95,
            "EDH": 0.97,
            "SAH": 0.96,
            "CalvarialFracture": 0.96,
            "MidlineShift": 0.97,
            "MassEffect": 0.92,
        },
    )
    hemorrhage_question = True

    def list_scans(self, root: Path, options: Mapping[str, Any]) -> tuple[list[ScanRef], list[Skipped]]:
        series_list = options.get("series_list")
        override = load_series_list(series_list) if series_list else {}
        scans = find_cq500_scans(root)
        if not scans:
            raise InputError(root, "no CQ500 scan folders (CQ500-CT-<n> or 'CQ500CT<n> CQ500CT<n>') in it")
        return [ScanRef(sid, folder, None, override.get(sid)) for sid, folder in scans.items()], []

    def read_scan(self, ref: ScanRef) -> tuple[Scan, np.ndarray | None, Path]:
        series = choose_series(ref.image, {ref.sid: ref.series} if ref.series else None)
        return read_dicom_scan(series), None, series

    def load_labels(self, root: Path, options: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
        return root / "reads.csv", read_cq500_reads(root / "reads.csv")

    def stratify_value(self, record: Any) -> int:
        return cq500_findings(record)["ICH"]

    def build_samples(
        self, sid: str, record: Any, rng: random.Random | None = None, seg: bool = True
    ) -> list[dict]:
        return build_cq500_samples(sid, record, rng)

    def report_text(self, record: Any, rng: random.Random | None = None) -> str:
        return phrasing.findings_report(cq500_findings(record), rng)


SOURCE = CQ500Source()
