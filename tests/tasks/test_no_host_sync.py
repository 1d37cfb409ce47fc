"""Training steps never make the host wait for the device, except at the log interval.

A stage-3 run of the real recipe (its callbacks: the non-finite guard, the preemption checkpoint, step
checkpoints, the learning-rate monitor; gradient clipping and activation checkpointing of every part on)
counts, per step, the operations whose result the host must read (`sync_counter.SyncCounter`). On a
GPU each of them stalls the host until the device has caught up, so the next kernels cannot be queued.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LAMED, REPO

from m3d_lit.cli import main

LOG_EVERY = 3
STEPS = 7


def _overlay(folder: Path) -> Path:
    overlay = {
        "trainer": {
            "callbacks": [
                {"class_path": "sync_counter.SyncCounter", "init_args": {"out": str(folder / "syncs.json")}},
                {"class_path": "m3d_lit.tasks.callbacks.StageCheckpoint",
                 "init_args": {"dirpath": str(folder / "steps"), "every_n_train_steps": LOG_EVERY * 2,
                               "save_top_k": 0, "save_last": True}},
                {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                 "init_args": {"logging_interval": "step"}},
                {"class_path": "m3d_lit.tasks.callbacks.NonFiniteGuard"},
                {"class_path": "m3d_lit.tasks.callbacks.PreemptionCheckpoint"},
            ],
        }
    }  # fmt: skip
    path = folder / "overlay.yaml"
    path.write_text(json.dumps(overlay))
    return path


@pytest.mark.slow
def test_stage3_steps_wait_for_the_device_only_at_the_log_interval(
    brainct_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    roots = [brainct_data["physionet"], brainct_data["cq500"]]  # [SEG] rows, blank-free
    argv = [
        "fit", "-c", str(REPO / "stages" / "stage3_finetune.yaml"), "-c", str(REPO / "stages/trainer/cpu.yaml"),
        "-c", str(_overlay(tmp_path)),
        "--model.preset", "tiny", "--model.overrides", json.dumps(LAMED), "--model.init_from", "null",
        "--model.gradient_checkpointing", "all",
        "--data.roots", json.dumps([str(r) for r in roots]), "--data.batch_size", "4",
        # batches are made in a worker process: the host work of collating is not the device's
        "--data.num_workers", "1",
        "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
        "--trainer.log_every_n_steps", str(LOG_EVERY), "--trainer.gradient_clip_val", "1.0",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((tmp_path / "syncs.json").read_text())
    assert [s["step"] for s in record["steps"]] == list(range(STEPS))
    waits = {s["step"]: s["calls"] for s in record["steps"] if (s["step"] + 1) % LOG_EVERY}
    assert waits and all(not calls for calls in waits.values()), json.dumps(waits, indent=1)
    # the counter sees the run: at the logged steps Lightning reads the logged values, the loss goes to
    # the host for the progress bar and the non-finite guard reads its record
    logged = [" ".join(s["calls"]) for s in record["steps"] if (s["step"] + 1) % LOG_EVERY == 0]
    assert logged and all("callbacks.py" in c and "base.py" in c and "apply_func.py" in c for c in logged)
