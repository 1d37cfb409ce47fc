"""Reading label tables: the CSV habits every source's label files share.

`read_table` accepts a UTF-8 byte-order mark (falling back to Latin-1), CRLF line endings and a missing
final newline, skips blank lines and keeps each row's line number; `column_index`, `check_width` and
`binary` raise `InputError` naming the file, the line and the problem (a missing column, a short row, a
value other than 0/1). The sources (`m3d_lit.data.sources`) read their own columns with them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from m3d_lit.errors import InputError

__all__ = ["Rows", "binary", "check_width", "column_index", "read_table"]

Rows = list[tuple[int, list[str]]]


def read_table(path: Path) -> tuple[list[str], Rows]:
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


def column_index(path: Path, header: list[str], required: list[str]) -> dict[str, int]:
    """Column name -> index of each required column; a missing or repeated one is an `InputError`."""
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


def check_width(path: Path, line: int, cells: list[str], width: int) -> list[str]:
    """The row's cells, if it has as many values as the header (blank trailing cells are fine)."""
    if len(cells) < width:
        raise InputError(path, f"line {line}: {len(cells)} values, the header has {width}")
    if any(cell.strip() for cell in cells[width:]):
        raise InputError(path, f"line {line}: {len(cells)} values, the header has {width}")
    return cells


def binary(path: Path, line: int, column: str, value: str) -> int:
    """A cell that must be 0 or 1."""
    value = value.strip()
    if value not in ("0", "1"):
        raise InputError(path, f"line {line}, column {column}: value {value!r} is not 0 or 1")
    return int(value)
