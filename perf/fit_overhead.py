"""A step of `m3d-lit fit` against the bare step of the same model on the same batches (stage 3, tiny).

Used by `perf/train_step.py --fit`. Both read the same prepared files through the same DataModule (the
stage-3 recipe's, 0 workers, no augmentation) in the same order: "fit" is the real command with the
stage-3 recipe's callbacks (checkpoints, learning-rate monitor, non-finite guard, preemption checkpoint)
and logging every 10 steps; "bare" is a loop of forward, backward and AdamW over the same trainable
weights. A step is the time from one batch's end to the next (fetching the batch included in both), as
wall time and as this process's CPU time: on a machine shared with other work, the wall time of either
swings by tens of percent with the others' load, while the CPU time counts what this process computed
(one torch thread, no worker processes), which is where an overhead of `fit` would show. The first
`WARMUP` steps of every run are not timed; runs alternate fit, bare, fit, bare, ... and the ratios are
those of the median steps.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback

WARMUP = 3
SIZE = (32, 64, 64)  # the tiny preset's volume
QUESTIONS = [
    ("Is there an intracranial hemorrhage?", "Yes, there is a bleed on the left side.", "open"),
    ("Is there a calvarial fracture?", "No.", "closed"),
    ("Segment the hemorrhage.", "It is [SEG].", "seg"),
]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class StepTimer(Callback):
    """(wall, CPU) seconds between consecutive training batch ends, written to `out` as JSON at the end."""

    def __init__(self, out: str) -> None:
        self.out, self.times, self.last = out, [], None

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = _clock()
        if self.last is not None:
            self.times.append([now[0] - self.last[0], now[1] - self.last[1]])
        self.last = now

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        Path(self.out).write_text(json.dumps(self.times))


def write_data(root: Path, scans: int) -> Path:
    """A `prepare`-like folder: float16 volumes, a mask per scan, open/closed/seg questions."""
    lines = []
    for i in range(scans):
        sid = f"scan{i}"
        gen = np.random.default_rng(zlib.crc32(sid.encode()))
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        np.save(root / "images" / f"{sid}.npy", gen.random((1, *SIZE)).astype(np.float16))
        np.save(root / "masks" / f"{sid}.npy", (gen.random((1, *SIZE)) > 0.9).astype(np.uint8))
        for question, answer, kind in QUESTIONS:
            line = {"id": sid, "qid": f"{sid}:{kind}", "image": f"images/{sid}.npy", "question": question,
                    "answer": answer, "kind": kind, "dataset": "perf", "patient": sid}  # fmt: skip
            if kind == "seg":
                line["mask"] = f"masks/{sid}.npy"
            lines.append(line)
    (root / "qa_train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def _fit(root: Path, work: Path, steps: int, batch: int) -> list[list[float]]:
    from m3d_lit.cli import main

    out = work / "fit_times.json"
    callbacks = [
        {"class_path": "m3d_lit.tasks.callbacks.StageCheckpoint",
         "init_args": {"dirpath": str(work / "ckpt"), "every_n_train_steps": 200, "save_top_k": 0,
                       "save_last": True}},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
        {"class_path": "m3d_lit.tasks.callbacks.NonFiniteGuard"},
        {"class_path": "m3d_lit.tasks.callbacks.PreemptionCheckpoint"},
        {"class_path": "fit_overhead.StepTimer", "init_args": {"out": str(out)}},
    ]  # fmt: skip
    overlay = work / "overlay.yaml"
    overlay.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    argv = [
        "fit", "-c", "stage3", "-c", "cpu", "-c", str(overlay), "--model.preset", "tiny", "--model.init_from",
        "null", "--data.roots", json.dumps([str(root)]), "--data.batch_size", str(batch),
        "--data.augment", "false", "--trainer.max_steps", str(steps + WARMUP + 1), "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(work),
    ]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(work)  # the recipe's logger writes under runs/
    try:
        if main(argv) != 0:
            raise RuntimeError("m3d-lit fit failed")
    finally:
        os.chdir(cwd)
    return json.loads(out.read_text())[WARMUP:]


def _bare(root: Path, steps: int, batch: int) -> list[list[float]]:
    from lightning.pytorch import seed_everything

    from m3d_lit.data.datamodules import BrainCTQADataModule
    from m3d_lit.tasks import FinetuneTask

    seed_everything(42)  # as the stage-3 recipe
    task = FinetuneTask(preset="tiny", lora={"r": 16, "alpha": 32, "dropout": 0.1}, w_dice=1.0, w_bce=1.0)
    task.train()
    data = BrainCTQADataModule([str(root)], batch_size=batch, augment=False)
    data.setup("fit")
    data.set_collator(task.configure_collate())
    optimizer = torch.optim.AdamW(task.param_groups(), lr=2.0e-5, weight_decay=0.0)
    times, last = [], None
    while len(times) < steps + WARMUP:
        for rows in data.train_dataloader():
            optimizer.zero_grad(set_to_none=True)
            task.forward_batch(rows)["loss"].backward()
            optimizer.step()
            now = _clock()
            if last is not None:
                times.append([now[0] - last[0], now[1] - last[1]])
            last = now
            if len(times) == steps + WARMUP:
                break
    return times[WARMUP:]


def _medians(runs: dict[str, list[list[float]]]) -> dict[str, float]:
    out = {}
    for kind, column in (("wall", 0), ("cpu", 1)):
        fit, bare = (statistics.median(t[column] for t in runs[name]) for name in ("fit", "bare"))
        out.update({f"fit_{kind}_s": fit, f"bare_{kind}_s": bare, f"fit_over_bare_{kind}": fit / bare})
    return out


def compare(steps: int, batch: int, rounds: int) -> dict[str, Any]:
    """Median step seconds (wall and CPU) of `m3d-lit fit` and of the bare loop, and their ratios."""
    runs: dict[str, list[list[float]]] = {"fit": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_data(Path(tmp) / "data", scans=max(8, batch * 2))
        for i in range(rounds):
            work = Path(tmp) / f"fit{i}"
            work.mkdir()
            runs["fit"] += _fit(root, work, steps, batch)
            runs["bare"] += _bare(root, steps, batch)
            now = _medians(runs)
            print(
                f"round {i + 1}: fit / bare {now['fit_over_bare_cpu']:.3f} in CPU time, "
                f"{now['fit_over_bare_wall']:.3f} in wall time",
                flush=True,
            )
    return {**_medians(runs), "steps": runs, "batch": batch, "threads": torch.get_num_threads(),
            "load": os.getloadavg()}  # fmt: skip
