"""The non-finite guard and the preemption checkpoint on 2 DDP ranks (CPU, gloo): the ranks agree at the
checks, which come every few steps instead of every step, and act together.

The ranks are forked from the test process (`ddp_fork`, as in test_ddp.py); each writes what it saw.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from toy_task import ToyTask

from m3d_lit.inference.checkpoints import read_checkpoint as load_checkpoint
from m3d_lit.tasks.callbacks import AtomicCheckpointIO, NonFiniteGuard, PreemptionCheckpoint


class _PoisonOnRank(Callback):
    """Makes the loss NaN on one rank at one step, with finite gradients (the NaN is a detached term), so
    only that rank can see it."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        poisoned = trainer.global_rank == self.rank and trainer.global_step == self.step
        pl_module.model.poison = {self.step: "detached"} if poisoned else {}


def _recording(callback: type, out: Path) -> type:
    """`callback` whose batch-end hook writes what stopped the rank (under `ddp_fork` only the first error
    reaches the test process)."""

    class Recording(callback):  # type: ignore[misc, valid-type]
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            try:
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            except BaseException as err:
                text = {"error": f"{type(err).__name__}: {err}", "step": trainer.global_step}
                (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(text))
                raise

    return Recording


class _SignalRankZero(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _fit(folder: Path, callbacks: list) -> None:
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=100, save_top_k=0, save_last=True)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=8, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[*callbacks, checkpoints], plugins=[AtomicCheckpointIO()],
        default_root_dir=folder, log_every_n_steps=3,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    try:
        trainer.fit(ToyTask())
    except Exception:  # each rank has written what stopped it
        pass


def test_a_nan_seen_by_one_rank_stops_both_at_the_same_check(tmp_path: Path) -> None:
    _fit(tmp_path, [_PoisonOnRank(rank=1, step=1), _recording(NonFiniteGuard, tmp_path)()])
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # found at the check after step 2 (the log interval is 3), by both ranks
    assert [s["step"] for s in seen] == [3, 3]
    assert "NonFiniteError: non-finite loss term loss=nan at step 1 (epoch 0, batch 1)" in seen[1]["error"]
    assert "non-finite loss or gradient on another rank at step 1" in seen[0]["error"]


def test_a_signal_to_one_rank_saves_on_both_at_the_next_check(tmp_path: Path) -> None:
    """SIGUSR1, SLURM's warning before the end of a job. (Under DDP Lightning handles SIGTERM itself as
    well: its training loop broadcasts a SIGTERM flag from rank 0 at every step.)"""
    _fit(tmp_path, [_SignalRankZero(step=1), _recording(PreemptionCheckpoint, tmp_path)()])
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["step"] for s in seen] == [3, 3] and all("SIGTERMException" in s["error"] for s in seen)
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3
