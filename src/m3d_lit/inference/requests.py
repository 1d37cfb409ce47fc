"""Request files of `m3d-lit predict`: one question about one scan per row, CSV or JSON Lines.

A CSV has the header `scan,question` (other columns are ignored); a `.jsonl` line is an object with the
keys `scan` and `question`. `scan` is a NIfTI file, a DICOM series folder (or a folder of several series)
or an `.npy` volume; a relative path starts from the request file's folder. A row that cannot be answered
(no scan, a scan that does not exist, an empty question, a line that is not JSON) is reported with its
line number, and the other rows are still answered.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from m3d_lit.errors import InputError
from m3d_lit.jsonl import read_jsonl

__all__ = ["COLUMNS", "RequestRow", "read_request_file"]

COLUMNS = ("scan", "question")


@dataclass(frozen=True)
class RequestRow:
    """One row of a request file."""

    line: int
    """Its line number in the file (the first data row of a CSV is line 2)."""
    scan: str
    """The scan as written in the file."""
    path: Path
    """The scan's path, relative ones resolved against the request file's folder."""
    question: str


def _rows_of_csv(path: Path, bad: list[tuple[int, str]]) -> list[tuple[int, dict]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(
                    path, f"its header {reader.fieldnames} lacks {missing}: the header is scan,question"
                )
            rows = []
            for row in reader:
                if None in row:  # more cells than the header has columns
                    bad.append(
                        (
                            reader.line_num,
                            f"has {len(row) - 1 + len(row[None])} cells, the header has {len(row) - 1}",
                        )
                    )
                    continue
                rows.append((reader.line_num, row))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(path, f"cannot be read as a CSV file ({err})") from None


def read_request_file(path: str | Path) -> tuple[list[RequestRow], list[tuple[int, str]]]:
    """(the rows that can be answered, the others as (line, problem)) of a request file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "request file not found (a .csv with the header scan,question, or a .jsonl)")
    bad: list[tuple[int, str]] = []
    if path.suffix.lower() == ".jsonl":
        raw = list(read_jsonl(path, bad))
    elif path.suffix.lower() == ".csv":
        raw = _rows_of_csv(path, bad)
    else:
        raise InputError(path, "is neither a .csv nor a .jsonl request file")
    rows = []
    for line, row in raw:
        scan, question = row.get("scan"), row.get("question")
        if not isinstance(scan, str) or not scan.strip():
            bad.append((line, "has no scan"))
        elif not isinstance(question, str) or not question.strip():
            bad.append((line, "has an empty question"))
        else:
            target = Path(scan.strip()).expanduser()
            target = target if target.is_absolute() else path.parent / target
            if not target.exists():
                bad.append((line, f"scan {scan.strip()} does not exist ({target})"))
            else:
                rows.append(RequestRow(line, scan.strip(), target, question.strip()))
    if not rows and not bad:
        raise InputError(path, "holds no requests")
    return rows, sorted(bad)
