"""A callback that appends the ids of every training batch to a file, one JSON line per rank and step.

Used by `test_streaming_train.py` through a trainer overlay; the subprocess finds it on `PYTHONPATH`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback


class RowLog(Callback):
    """Append `{"step", "rank", "rows"}` (id and question) for each training batch to `path` (the step the batch completes)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = [f"{i} | {q}" for i, q in zip(batch["ids"], batch["questions"])]  # a scan's rows share its id
        line = {"step": trainer.global_step, "rank": trainer.global_rank, "rows": rows}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
