"""What a data source gives `prepare`, `write_qa` and the report, and the helpers the sources share.

A source is one on-disk layout of raw scans and labels (CQ500, PhysioNet CT-ICH, a folder of the user's
own scans). `prepare` lists its scans, reads each one and writes the volume cache; `write_qa` reads its
labels and builds the questions; the report takes its display name and the published figures measured
on its data (`references.Reference`).
None of them branches on a source's name: they ask the `Source` object (`m3d_lit.data.sources`).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.data.geometry import Scan
from m3d_lit.data.sources.references import Reference
from m3d_lit.errors import InputError

__all__ = ["ScanRef", "Skipped", "Source", "qa_sample", "relative", "safe_id", "scans_by_id"]

Skipped = tuple[str, str, str]  # (id, path relative to the root, reason)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def safe_id(sid: str, where: str | os.PathLike = "id") -> str:
    """Return `sid` if it is safe as a file name inside OUT (no `..`, `/` or `\\`), else raise InputError."""
    if ".." in sid or not _SAFE_ID.match(sid):
        raise InputError(
            where, f"scan id {sid!r} is not allowed (letters, digits, '.', '_', '-'; no '..' or '/')"
        )
    return sid


def scans_by_id(root: str | os.PathLike, scan_id: Callable[[Path], str | None]) -> dict[str, Path]:
    """Scan id -> entry for every entry directly under `root` that `scan_id` names (None: not a scan), in
    name order; two entries with one id are refused, naming both."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    scans: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        sid = scan_id(entry)
        if sid is None:
            continue
        if sid in scans:
            raise InputError(root, f"scan {sid!r} appears twice: {scans[sid].name!r} and {entry.name!r}")
        scans[sid] = entry
    return scans


def relative(path: Path, root: Path) -> str:
    """`path` relative to `root` in POSIX form, or as given when it is outside `root`."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class ScanRef:
    """One scan as a source lists it.

    Args:
        sid: the scan id (image file stem in OUT, and the patient).
        image: a scan folder, a DICOM series folder or a NIfTI file.
        mask: the scan's mask file, or None.
        series: a series chosen by the user, relative to `image` (CQ500's series list).
    """

    sid: str
    image: Path
    mask: Path | None = None
    series: str | None = None


def qa_sample(
    dataset: str, sid: str, key: str, kind: str, question: str, answer: str, label: dict
) -> dict[str, Any]:
    """One QA line (docs/architecture.md "Prepared data"); `qid` is `<id>:<key>`."""
    return {
        "id": sid,
        "qid": f"{sid}:{key}",
        "image": f"images/{sid}.npy",
        "question": question,
        "answer": answer,
        "kind": kind,
        "label": label,
        "dataset": dataset,
        "patient": sid,
    }


class Source:
    """One raw-data layout; subclasses fill in the attributes and methods that differ.

    Attributes:
        name: the name `prepare` and the QA lines use (`dataset`).
        display_name: the name tables show.
        options: the source-specific `prepare` options it accepts, name -> help text (`m3d-lit prepare`
            offers each as `--name-with-dashes PATH`).
        required_options: those it cannot do without.
        qa_reference: published text metrics (keys bleu1..bleu4, rouge, meteor) on this source's
            question answering, or None; the report shows them only beside this source's rows.
        table1_records: which QA records of one scan `qa_reference` covers, in words (report), or None.
        finding_reference: published AUROCs on this source's scans, by finding key, or None.
        seg_reference: a published Dice (key `dice`) on this source's masks, or None.
        hemorrhage_question: its open question is the brain-CT hemorrhage question that
            `evaluation.open_findings` reads as findings.
    """

    name: str = ""
    display_name: str = ""
    options: Mapping[str, str] = {}
    required_options: tuple[str, ...] = ()
    qa_reference: Reference | None = None
    table1_records: str | None = None
    finding_reference: Reference | None = None
    seg_reference: Reference | None = None
    hemorrhage_question: bool = False

    def check_options(self, options: Mapping[str, Any], accepted_by: Mapping[str, list[str]]) -> None:
        """Refuse options this source does not take and missing required ones.

        Args:
            options: option name -> value (None values count as absent).
            accepted_by: option name -> the sources that take it, for the message.
        """
        for key, value in options.items():
            if value is not None and key not in self.options:
                raise InputError(key, f"applies to {', '.join(accepted_by.get(key, [])) or 'no source'} only")
        for key in self.required_options:
            if options.get(key) is None:
                raise InputError(key, f"{self.name} needs it (--{key.replace('_', '-')})")

    def writes_masks(self, options: Mapping[str, Any]) -> bool:
        """Whether `prepare` writes OUT/masks/ for this source with these options."""
        return False

    def list_scans(self, root: Path, options: Mapping[str, Any]) -> tuple[list[ScanRef], list[Skipped]]:
        """The scans under `root`, and the ones already known to be unusable (id, path, reason)."""
        raise NotImplementedError

    def read_scan(self, ref: ScanRef) -> tuple[Scan, np.ndarray | None, Path]:
        """Read one listed scan: (the scan in HU, its canonical uint8 mask or None, the file or folder read)."""
        raise NotImplementedError

    def load_labels(self, root: Path, options: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
        """(the label file or folder for messages, scan id -> this source's label record)."""
        raise NotImplementedError

    def match_prepared(self, root: Path, out_dir: Path, records: Mapping[str, Any]) -> None:
        """Check (and complete) the label records of the prepared scans against what `prepare` wrote into
        `out_dir` (its manifest, its masks); default: nothing."""

    def stratify_value(self, record: Any) -> int:
        """The 0/1 value the patient-level splits are stratified by."""
        raise NotImplementedError

    def build_samples(
        self, sid: str, record: Any, rng: random.Random | None = None, seg: bool = True
    ) -> list[dict]:
        """The QA lines of one scan; `rng` picks training paraphrases, None the canonical wording."""
        raise NotImplementedError

    def report_text(self, record: Any, rng: random.Random | None = None) -> str:
        """The findings report of one scan (`reports.jsonl`, stages 1 and 2)."""
        raise NotImplementedError
