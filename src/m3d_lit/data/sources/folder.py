"""Your own scans: a folder of NIfTI files or DICOM series, a label CSV and a findings YAML.

    m3d-lit prepare folder --root SCANS --labels labels.csv --findings findings.yaml [--masks MASKS]

- scans: `SCANS/<id>.nii`, `SCANS/<id>.nii.gz` or a DICOM series folder `SCANS/<id>/` (a folder of
  several series gets one picked by `io.pick_series`); hidden entries and other files are ignored.
- `labels.csv`: header `id,<finding>,...`, one row per scan, values 0 or 1; an optional `<finding>_side`
  column holds `left`, `right`, `both` or nothing (only where the finding is 1).
- `findings.yaml`: `findings:` maps each finding name to `question:` and optional `yes:` / `no:` answers
  (default `Yes.` / `No.`; they must start with Yes / No, which is how eval reads them) and an optional
  `name:` (the words the open answer uses; default the finding name, `_` read as a space); optional
  top-level `open_question:`, `no_findings:` (the open answer when nothing is present) and `segment:`
  (`question:`, `yes:`, `no:` of the segmentation sample; `yes:` must hold `[SEG]`).
- masks (optional): `MASKS/<id>.nii` or `.nii.gz` on the scan's grid (the same array shape and affine).

Per scan: one closed question per finding, one open question whose answer lists the present findings
(with their sides), and with masks a segmentation sample (`[SEG]` when the mask is not empty). Every
bad row or key is an `InputError` naming the file and line.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from m3d_lit.data.geometry import Scan
from m3d_lit.data.io import find_series, read_dicom_scan, read_mask, read_nifti_scan
from m3d_lit.data.labels import binary, check_width, read_table
from m3d_lit.data.sources.base import ScanRef, Skipped, Source, qa_sample, relative, safe_id, scans_by_id
from m3d_lit.errors import InputError

__all__ = [
    "Finding",
    "FindingsSpec",
    "FolderRecord",
    "SIDES",
    "SOURCE",
    "find_scans",
    "read_findings",
    "read_labels",
]

SIDES = ("left", "right", "both")
DEFAULT_OPEN_QUESTION = "Which findings does this scan show?"
DEFAULT_NO_FINDINGS = "No findings."
DEFAULT_SEGMENT = {
    "question": "Segment the abnormality.",
    "yes": "It is [SEG].",
    "no": "There is nothing to segment.",
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_TOP_KEYS = ("findings", "open_question", "no_findings", "segment")
_FINDING_KEYS = ("question", "yes", "no", "name")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false are booleans, so `yes:` and `no:` stay the words they are."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass(frozen=True)
class Finding:
    """One finding of `findings.yaml`: its closed question, the two answers and its words."""

    key: str
    question: str
    yes: str
    no: str
    words: str


@dataclass(frozen=True)
class FindingsSpec:
    """`findings.yaml` as read: the findings in file order, the open and segmentation wording, and the
    line of each finding (for messages)."""

    findings: tuple[Finding, ...]
    open_question: str
    no_findings: str
    segment: Mapping[str, str]
    lines: Mapping[str, int]


@dataclass
class FolderRecord:
    """One scan's labels: finding -> 0/1, finding -> side (or None), and the findings spec.

    `mask_nonempty` is set from the prepared mask (`OUT/masks/<id>.npy`) when there is one.
    """

    values: dict[str, int]
    sides: dict[str, str | None]
    spec: FindingsSpec
    mask_nonempty: bool | None = None


# ---------------------------------------------------------------- findings.yaml


def _key_lines(path: Path, node: Any) -> dict[str, int]:
    """Key -> 1-based line of a YAML mapping node's keys; a key given twice is an `InputError`."""
    lines: dict[str, int] = {}
    for key, _ in node.value if isinstance(node, yaml.MappingNode) else ():
        line = key.start_mark.line + 1
        if str(key.value) in lines:
            raise InputError(
                path, f"line {line}: {key.value!r} given twice (first on line {lines[str(key.value)]})"
            )
        lines[str(key.value)] = line
    return lines


def _child(node: Any, name: str) -> Any:
    """The value node of key `name` in a YAML mapping node, or None."""
    pairs = node.value if isinstance(node, yaml.MappingNode) else ()
    return next((value for key, value in pairs if key.value == name), None)


def _text(path: Path, line: int, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(path, f"line {line}: {where} must be a non-empty text, got {value!r}")
    return " ".join(value.split())


def read_findings(path: str | Path) -> FindingsSpec:
    """Read and check `findings.yaml` (format: the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise InputError(path, f"{where}not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("findings"), dict) or not data["findings"]:
        raise InputError(path, "expected a top-level 'findings:' mapping each finding name to its question")
    top_lines = _key_lines(path, root)
    for key in data:
        if key not in _TOP_KEYS:
            raise InputError(
                path, f"line {top_lines.get(str(key), 1)}: unknown key {key!r}; valid: {_TOP_KEYS}"
            )
    lines = _key_lines(path, _child(root, "findings"))
    findings = []
    for name, entry in data["findings"].items():
        line = lines.get(str(name), top_lines["findings"])
        name = str(name)
        if not _NAME.match(name) or name == "id" or name.endswith("_side"):
            raise InputError(
                path,
                f"line {line}: finding name {name!r} must start with a letter, hold letters, digits, "
                "'_', '.', '-', and not be 'id' or end in '_side'",
            )
        if not isinstance(entry, dict):
            raise InputError(
                path, f"line {line}: finding {name!r} needs 'question:' (and optional 'yes:', 'no:')"
            )
        unknown = [k for k in entry if k not in _FINDING_KEYS]
        if unknown:
            raise InputError(
                path, f"line {line}: finding {name!r}: unknown key {unknown[0]!r}; valid: {_FINDING_KEYS}"
            )
        if "question" not in entry:
            raise InputError(path, f"line {line}: finding {name!r} has no 'question:'")
        answers = {}
        for word, default in (("yes", "Yes."), ("no", "No.")):
            answer = _text(path, line, f"{name}.{word}", entry.get(word, default))
            match = _YES_NO.match(answer)
            if match is None or match.group(1).lower() != word:
                raise InputError(
                    path, f"line {line}: {name}.{word} {answer!r} must start with {word.capitalize()}"
                )
            answers[word] = answer
        words = _text(path, line, f"{name}.name", entry.get("name", name.replace("_", " ")))
        question = _text(path, line, f"{name}.question", entry["question"])
        findings.append(Finding(name, question, answers["yes"], answers["no"], words))
    segment = dict(DEFAULT_SEGMENT)
    if "segment" in data:
        line = top_lines["segment"]
        if not isinstance(data["segment"], dict) or any(k not in DEFAULT_SEGMENT for k in data["segment"]):
            raise InputError(path, f"line {line}: 'segment:' may hold {tuple(DEFAULT_SEGMENT)}")
        segment.update({k: _text(path, line, f"segment.{k}", v) for k, v in data["segment"].items()})
        if "[SEG]" not in segment["yes"] or "[SEG]" in segment["no"]:
            raise InputError(path, f"line {line}: segment.yes must hold [SEG] and segment.no must not")
    open_question = _text(
        path,
        top_lines.get("open_question", 1),
        "open_question",
        data.get("open_question", DEFAULT_OPEN_QUESTION),
    )
    no_findings = _text(
        path, top_lines.get("no_findings", 1), "no_findings", data.get("no_findings", DEFAULT_NO_FINDINGS)
    )
    return FindingsSpec(tuple(findings), open_question, no_findings, segment, lines)


# ---------------------------------------------------------------- labels.csv


def read_labels(
    path: str | Path, spec: FindingsSpec, spec_path: str | Path
) -> tuple[dict[str, FolderRecord], dict[str, int]]:
    """Read and check `labels.csv` against the findings of `spec`.

    Returns:
        (scan id -> record, scan id -> its line in the CSV).
    """
    path, spec_path = Path(path), Path(spec_path)
    header, rows = read_table(path)
    if not header or header[0] != "id":
        raise InputError(path, f"line 1: the first column must be 'id', got {header[0] if header else ''!r}")
    names = [f.key for f in spec.findings]
    columns: dict[str, int] = {}
    for i, column in enumerate(header[1:], start=1):
        base = column[: -len("_side")] if column.endswith("_side") else column
        if base not in names:
            raise InputError(
                path,
                f"line 1: column {column!r} is not a finding of {spec_path.name} (its findings: {names})",
            )
        if column in columns:
            raise InputError(path, f"line 1: column {column!r} appears twice")
        columns[column] = i
    for name in names:
        if name not in columns:
            raise InputError(
                spec_path, f"line {spec.lines.get(name, 1)}: finding {name!r} has no column in {path.name}"
            )
    if not rows:
        raise InputError(path, "no scans below the header")
    records: dict[str, FolderRecord] = {}
    where: dict[str, int] = {}
    for line, cells in rows:
        cells = check_width(path, line, cells, len(header))
        sid = cells[0].strip()
        if not sid:
            raise InputError(path, f"line {line}: empty id")
        safe_id(sid, f"{path}: line {line}")
        if sid in records:
            raise InputError(path, f"line {line}: id {sid!r} appears twice (first on line {where[sid]})")
        values = {name: binary(path, line, name, cells[columns[name]]) for name in names}
        sides: dict[str, str | None] = {}
        for name in names:
            side = cells[columns[f"{name}_side"]].strip().lower() if f"{name}_side" in columns else ""
            if side and side not in SIDES:
                raise InputError(
                    path, f"line {line}, column {name}_side: {side!r} is not one of {SIDES} or empty"
                )
            if side and not values[name]:
                raise InputError(path, f"line {line}, column {name}_side: a side for a finding marked 0")
            sides[name] = side or None
        records[sid] = FolderRecord(values, sides, spec)
        where[sid] = line
    return records, where


# ---------------------------------------------------------------- scans and masks


def _scan_id(entry: Path) -> str | None:
    """`<id>/` (a DICOM series), `<id>.nii` or `<id>.nii.gz`; None for anything else or a hidden name."""
    if entry.name.startswith("."):
        return None
    if entry.is_dir():
        return entry.name
    return _NIFTI.sub("", entry.name) if entry.is_file() and _NIFTI.search(entry.name) else None


def find_scans(root: str | Path) -> dict[str, Path]:
    """Scan id -> NIfTI file or DICOM folder for every scan directly under `root`."""
    return scans_by_id(root, _scan_id)


def _mask_for(masks: Path, sid: str) -> Path | None:
    return next((p for p in (masks / f"{sid}.nii", masks / f"{sid}.nii.gz") if p.is_file()), None)


def _describe(sid: str) -> str:
    return f"{sid}.nii, {sid}.nii.gz or a DICOM folder {sid}/"


class FolderSource(Source):
    """A folder of the user's own scans (see the module docstring)."""

    name = "folder"
    display_name = "Folder"
    options = {
        "labels": "labels.csv (id,<finding>,...; one row per scan); required, no default",
        "findings": "findings.yaml (each finding's question); required, no default",
        "masks": "masks folder (<id>.nii or .nii.gz on the scan's grid; default: no masks, no [SEG] "
        "question)",
    }
    required_options = ("labels", "findings")

    def writes_masks(self, options: Mapping[str, Any]) -> bool:
        return options.get("masks") is not None

    def _labels(self, options: Mapping[str, Any]) -> tuple[Path, dict[str, FolderRecord], dict[str, int]]:
        spec_path, label_path = Path(options["findings"]), Path(options["labels"])
        records, lines = read_labels(label_path, read_findings(spec_path), spec_path)
        return label_path, records, lines

    def list_scans(self, root: Path, options: Mapping[str, Any]) -> tuple[list[ScanRef], list[Skipped]]:
        label_path, records, lines = self._labels(options)
        scans = find_scans(root)
        for sid, line in lines.items():
            if sid not in scans:
                raise InputError(
                    label_path, f"line {line}: unknown id {sid!r}: no {_describe(sid)} in {root}"
                )
        for sid, image in scans.items():
            if sid not in records:
                raise InputError(image, f"scan {sid!r} has no row in {label_path}")
        masks = Path(options["masks"]) if options.get("masks") is not None else None
        if masks is not None:
            if not masks.is_dir():
                raise InputError(masks, "not a folder (--masks)")
            for entry in sorted(masks.iterdir()):
                stem = _NIFTI.sub("", entry.name)
                if entry.is_file() and stem != entry.name and stem not in scans:
                    raise InputError(entry, f"mask of an unknown scan: no {_describe(stem)} in {root}")
        refs, skipped = [], []
        for sid, image in scans.items():
            mask = _mask_for(masks, sid) if masks is not None else None
            if masks is not None and mask is None:
                skipped.append(
                    (sid, relative(masks / f"{sid}.nii.gz", root), f"no mask for {sid} in {masks}")
                )
                continue
            refs.append(ScanRef(sid, image, mask))
        return refs, skipped

    def read_scan(self, ref: ScanRef) -> tuple[Scan, np.ndarray | None, Path]:
        if ref.image.is_dir():
            series = find_series(ref.image)
            scan = read_dicom_scan(series)
            mask = read_mask(ref.mask, scan, series) if ref.mask is not None else None
            return scan, mask, series
        scan, mask = read_nifti_scan(ref.image, ref.mask)
        return scan, mask, ref.image

    def load_labels(self, root: Path, options: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
        label_path, records, _ = self._labels(options)
        return label_path, records

    def match_prepared(self, root: Path, out_dir: Path, records: Mapping[str, Any]) -> None:
        for sid, record in records.items():
            path = out_dir / "masks" / f"{sid}.npy"
            if path.is_file():
                record.mask_nonempty = bool(np.load(path, allow_pickle=False).any())

    def stratify_value(self, record: Any) -> int:
        return int(any(record.values.values()))

    def _open_answer(self, record: FolderRecord) -> str:
        present = []
        for finding in record.spec.findings:
            if record.values[finding.key]:
                side = record.sides[finding.key]
                where = "" if side is None else " on both sides" if side == "both" else f" on the {side} side"
                present.append(finding.words + where)
        if not present:
            return record.spec.no_findings
        listed = present[0] if len(present) == 1 else f"{', '.join(present[:-1])} and {present[-1]}"
        return f"{listed[:1].upper()}{listed[1:]}."

    def build_samples(
        self, sid: str, record: Any, rng: random.Random | None = None, seg: bool = True
    ) -> list[dict]:
        spec: FindingsSpec = record.spec
        values = {f.key: record.values[f.key] for f in spec.findings}
        samples = [
            qa_sample(
                "folder", sid, "findings", "open", spec.open_question, self._open_answer(record), values
            )
        ]
        for f in spec.findings:
            answer = f.yes if record.values[f.key] else f.no
            samples.append(
                qa_sample("folder", sid, f.key, "closed", f.question, answer, {f.key: values[f.key]})
            )
        if seg and record.mask_nonempty is not None:
            answer = spec.segment["yes"] if record.mask_nonempty else spec.segment["no"]
            segment = qa_sample("folder", sid, "segment", "seg", spec.segment["question"], answer, {})
            segment["mask"] = f"masks/{sid}.npy"
            samples.append(segment)
        return samples

    def report_text(self, record: Any, rng: random.Random | None = None) -> str:
        return self._open_answer(record)


SOURCE = FolderSource()
