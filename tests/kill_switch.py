"""A callback that SIGKILLs its own training process at a fixed step: a crash at a known point, on any machine.

Used by `test_resume.py` through a trainer overlay; the subprocess finds it on `PYTHONPATH`.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class KillAtStep(Callback):
    """Kill the process before the batch that would run optimizer step `step` + 1."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
