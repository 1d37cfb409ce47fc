"""The raw-data sources `m3d-lit prepare` reads, one module each, looked up by name.

A source (`base.Source`) lists a layout's scans, reads one, reads its labels and builds its questions
and reports; the report takes its display name and the published figures measured on its data
(`reference_for`) from it. Adding a dataset is one module here plus its entry in `SOURCES` (and a data
recipe under `datamodules/`).
"""

from __future__ import annotations

from typing import Literal

from m3d_lit.data.sources import cq500, folder, physionet
from m3d_lit.data.sources.base import ScanRef, Skipped, Source, qa_sample, relative, safe_id
from m3d_lit.data.sources.references import Reference
from m3d_lit.errors import InputError

__all__ = [
    "SOURCES",
    "Reference",
    "ScanRef",
    "Skipped",
    "Source",
    "display_name",
    "get_source",
    "option_help",
    "option_owners",
    "qa_sample",
    "reference_for",
    "relative",
    "safe_id",
]

SOURCES: dict[str, Source] = {s.name: s for s in (cq500.SOURCE, physionet.SOURCE, folder.SOURCE)}


def get_source(name: str) -> Source:
    """The source called `name`; an unknown name is an `InputError` listing the known ones."""
    if name not in SOURCES:
        raise InputError("dataset", f"{name!r} is not one of {tuple(SOURCES)}")
    return SOURCES[name]


def display_name(name: str) -> str:
    """The name tables show for a `dataset` value: the source's display name, else the value itself."""
    source = SOURCES.get(name)
    return source.display_name if source is not None else name


def reference_for(name: str, kind: Literal["qa", "finding", "seg"]) -> Reference | None:
    """The published figures of one kind measured on the data of `dataset` value `name`, or None.

    Figures belong to the data they were measured on: a dataset without a source (records with no
    `dataset`, an unknown name) or a source that has none gets None, never another dataset's figures.

    Args:
        name: a `dataset` value of the records.
        kind: `qa` (text metrics), `finding` (AUROC per finding key) or `seg` (Dice).
    """
    source = SOURCES.get(name)
    return None if source is None else getattr(source, f"{kind}_reference")


def option_owners() -> dict[str, list[str]]:
    """Source-specific `prepare` option -> the sources that take it."""
    owners: dict[str, list[str]] = {}
    for source in SOURCES.values():
        for option in source.options:
            owners.setdefault(option, []).append(source.name)
    return owners


def option_help() -> dict[str, str]:
    """Source-specific `prepare` option -> its help, prefixed with the sources that take it."""
    helps: dict[str, str] = {}
    for source in SOURCES.values():
        for option, text in source.options.items():
            helps.setdefault(option, f"{', '.join(option_owners()[option])}: {text}")
    return helps
