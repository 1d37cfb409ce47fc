"""Reading JSON Lines files: the one reader of every `.jsonl` m3d-lit reads (QA, predictions, requests).

Writing goes through `m3d_lit.atomic.write_jsonl` (a whole file at once, atomically).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m3d_lit.errors import InputError

__all__ = ["read_jsonl"]


def read_jsonl(
    path: str | Path, bad: list[tuple[int, str]] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a file that cannot be read, or a line that is not
    a JSON object, is an `InputError` naming the file and the line.

    Args:
        path: the file.
        bad: when given, a line that is not a JSON object is appended here as (line number, problem) and
            skipped instead (a request file whose other lines are still answered).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read it as UTF-8 text ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            problem = None if isinstance(obj, dict) else f"is not a JSON object but a {type(obj).__name__}"
        except json.JSONDecodeError as err:
            obj, problem = None, f"is not JSON: {err.msg} (column {err.colno})"
        if problem is None:
            yield number, obj
        elif bad is None:
            raise InputError(path, f"line {number} {problem}")
        else:
            bad.append((number, problem))
