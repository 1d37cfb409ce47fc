"""Official M3D directories where m3d-lit takes a checkpoint (`--checkpoint`, `--model.init_from`).

`official_kind` tells an M3D-LaMed directory; `known_window` and `scan_window` give the CT window a model
reads scans with (an official one: M3D's plain min-max). `tasks/loading.load_official_task` makes an
M3D-LaMed directory a stage-3 `FinetuneTask` whose model is built from the directory (`llm_path` names
it, so a fine-tuned checkpoint is rebuilt from the same directory before its own weights load). For
`eval`, `ask`, `bench` and `export` it is used as released: nothing is trainable and no LoRA is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m3d_lit.models.official.lamed import is_official_lamed

__all__ = ["OFFICIAL_WINDOW", "known_window", "official_kind", "scan_window"]

# M3D min-maxes a volume over its whole range (no HU window): what an official model was trained on
OFFICIAL_WINDOW = "none"


def official_kind(path: str | Path) -> str | None:
    """`lamed` for an official M3D-LaMed directory, else None."""
    return "lamed" if is_official_lamed(path) else None


def known_window(record: dict[str, Any]) -> str | None:
    """The CT window a model with this `load_task` record was trained on, where that is known: the one
    its data was prepared with, or M3D's plain min-max for an official directory; else None."""
    window = (record.get("preprocessing") or {}).get("window")
    return window or (OFFICIAL_WINDOW if record.get("official") else None)


def scan_window(record: dict[str, Any]) -> str:
    """The CT window a scan is read with for a model with this `load_task` record: the one its data was
    prepared with; for an official directory M3D's plain min-max; else m3d-lit's default (`brain`)."""
    return known_window(record) or "brain"
