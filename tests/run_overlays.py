"""Trainer overlays of the stage-3 runs that are killed and resumed, and the losses those runs log.

Shared by `tasks/test_resume.py` (one process) and `tasks/test_multinode.py` (two machines, FSDP): each
run writes its losses to a CSV log every step and a `last.ckpt` every EVERY steps, and with `kill_at`
SIGKILLs itself (`kill_switch.KillAtStep`, which its subprocess finds through `conftest.TESTS` on its
`PYTHONPATH`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

# a stage-3 model of one ViT layer and one LLM layer on the tiny preset
SMALL = {"vision": {"num_layers": 1}, "llm": {"num_hidden_layers": 1}}
STEPS, EVERY = 8, 2


def run_overlay(folder: Path, run: str, version: int, kill_at: int | None = None, steps: int = STEPS) -> Path:
    """Trainer settings of one run: `steps` steps, CSV losses every step, last.ckpt every EVERY steps, no
    validation; with `kill_at`, the process kills itself before optimizer step `kill_at` + 1."""
    overlay = {
        "trainer": {
            "max_steps": steps,
            "max_epochs": -1,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(folder / "logs"), "name": run, "version": version,
                              "flush_logs_every_n_steps": 1},
            },
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(folder / run), "every_n_train_steps": EVERY,
                               "save_top_k": 0, "save_last": True}},
                {"class_path": "m3d_lit.tasks.callbacks.NonFiniteGuard"},
                {"class_path": "m3d_lit.tasks.callbacks.PreemptionCheckpoint"},
            ],
            "plugins": [{"class_path": "m3d_lit.tasks.callbacks.AtomicCheckpointIO"}],
        }
    }  # fmt: skip
    if kill_at is not None:
        overlay["trainer"]["callbacks"].append(
            {"class_path": "kill_switch.KillAtStep", "init_args": {"step": kill_at}}
        )
    path = folder / f"{run}-{version}.yaml"
    path.write_text(json.dumps(overlay))  # YAML is a superset of JSON
    return path


def logged_losses(folder: Path, run: str, version: int) -> dict[int, str]:
    """The `train/loss` that version `version` of `run` logged, by step (none if it logged nothing)."""
    path = folder / "logs" / run / f"version_{version}" / "metrics.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(handle) if r.get("train/loss")}
