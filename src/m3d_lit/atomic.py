"""Write files atomically: into a unique temporary file beside the target, then `os.replace` over it.

A reader (or a resumed run) sees the old file or the new one, never a half-written one; a write that
fails removes its temporary file. The temporary names are `.<name>.tmp-<random><suffix>` in the target's
folder (created exclusively with a random part: unique even for two processes writing the same target), so a clean-up after
a killed run can find them with the pattern `.*.tmp-*`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_PATTERN",
    "atomic_folder",
    "atomic_path",
    "save_npy",
    "torch_save",
    "write_bytes",
    "write_json",
    "write_jsonl",
    "write_text",
]

TMP_PATTERN = ".*.tmp-*"


def _create_unique(path: Path, suffix: str) -> Path:
    """Create an empty, new temporary file beside `path` (as `tempfile.mkstemp` does, but with the
    permissions the umask gives, which the target then keeps)."""
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a fresh temporary path beside `path` to write to; on success it replaces `path` in one step.

    Args:
        path: the target file (its folder is created).
        suffix: ending of the temporary name, for writers that read the format from it (`.nii.gz`, `.npy`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_unique(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path` to fill; on success it replaces `path` whole.

    An earlier `path` is moved aside only once the new folder is complete, then removed: a reader sees
    the old folder or the new one, and no file of the old one survives in the new. A failure removes
    the temporary folder and leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result gets the usual permissions
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8, `\\n` line ends as given) to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """Write `data` as JSON (NaN and infinities refused) with a final newline, atomically."""
    write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Write one JSON document per line (non-ASCII kept as it is), atomically."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def save_npy(path: str | os.PathLike, array: Any) -> None:
    """`np.save` (no pickles) to `path` atomically."""
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` atomically, flushed to disk before the rename (checkpoints)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
