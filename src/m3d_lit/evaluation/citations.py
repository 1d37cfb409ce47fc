"""What report.md cites: the captions name each published figure's work, the last section cites it in full."""

from __future__ import annotations

from m3d_lit.data.sources import Reference
from m3d_lit.data.sources.references import Work

__all__ = ["cite", "references_section"]


def cite(cited: list[Work], reference: Reference) -> str:
    """`reference`'s caption; its work joins `cited` (once) for the references section."""
    if reference.work not in cited:
        cited.append(reference.work)
    return reference.caption()


def references_section(cited: list[Work]) -> list[str]:
    """`## References`: each cited work in full, in the order the report first cites it."""
    if not cited:
        return []
    return ["## References", ""] + [f"- {work.full}" for work in cited]
