"""What a DataModule tells a checkpoint about its data: how each source's scans became volumes, and a
fingerprint of the files it read.

The protocol (`BaseDataModule.preprocessing` and `BaseDataModule.fingerprint()`, docs/architecture.md
"Data a checkpoint records"): `preprocessing` maps each training source (`cq500`, `physionet`,
`m3d_vqa`, ...) to `{"size": [D, H, W] or None, "window": name or None}`; `fingerprint()` is a hash of
the split files (and the `prepare.json` and `manifest.csv` beside them, whose sha256 column covers
every prepared volume). The checkpoint's bundle records both (`m3d_lit.inference.bundle`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.errors import InputError

__all__ = ["PREPARE_SETTINGS", "files_fingerprint", "merge_sources", "prepared_settings", "volume_size"]

PREPARE_SETTINGS = "prepare.json"
# beside a split file, these describe the data too (the manifest holds each volume's sha256)
_DESCRIBING = (PREPARE_SETTINGS, "manifest.csv")
_BLOCK = 1 << 20


def prepared_settings(root: str | Path) -> dict[str, Any] | None:
    """The `prepare.json` of an `m3d-lit prepare` folder (dataset, size, window, dtype), or None."""
    path = Path(root) / PREPARE_SETTINGS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot be read as JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(path, "is not a JSON object")
    return data


def volume_size(path: str | Path) -> list[int] | None:
    """(D, H, W) of a prepared `.npy` volume from its header, or None when it cannot be read."""
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError):
        return None
    return [int(s) for s in shape[-3:]] if len(shape) >= 3 else None


def merge_sources(parts: Iterable[Mapping[str, Mapping[str, Any]]], where: str | Path) -> dict[str, dict]:
    """One `preprocessing` mapping from several; a source named twice with other settings is refused."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, settings in part.items():
            settings = {"size": settings.get("size"), "window": settings.get("window")}
            if name in merged and merged[name] != settings:
                raise InputError(
                    where,
                    f"source {name!r} comes with two preprocessings ({merged[name]} and {settings}): a "
                    "model reads one source one way; prepare its folders with the same --size and --window",
                )
            merged[name] = settings
    return merged


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def files_fingerprint(files: Iterable[str | Path]) -> str | None:
    """A hash of the split files a DataModule read and of the settings and manifest beside them, or
    None when it read none. Names enter by file name only, so a moved folder keeps its fingerprint."""
    chosen: set[Path] = set()
    for file in files:
        file = Path(file)
        chosen.add(file)
        chosen.update(file.parent / name for name in _DESCRIBING if (file.parent / name).is_file())
    if not chosen:
        return None
    entries = sorted((f"{p.parent.name}/{p.name}", _file_sha256(p)) for p in chosen if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
