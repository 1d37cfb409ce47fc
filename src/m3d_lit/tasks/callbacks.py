"""Reliability pieces of a training run: atomic checkpoint files, a `last.ckpt` that holds the newest state,
a guard against non-finite steps, and a checkpoint saved when the job is told to stop (SIGTERM, SIGUSR1);
and `PredictionWriter`, the predictions of LightningCLI's `predict` as one JSONL file.

They are listed in the stage recipes (`stages/*.yaml`): `AtomicCheckpointIO` under `trainer.plugins`,
`StageCheckpoint`, `NonFiniteGuard` and `PreemptionCheckpoint` under `trainer.callbacks`.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from m3d_lit.atomic import torch_save as atomic_torch_save
from m3d_lit.atomic import write_jsonl
from m3d_lit.errors import TrainingError

__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteError",
    "NonFiniteGuard",
    "PredictionWriter",
    "PreemptionCheckpoint",
    "StageCheckpoint",
    "atomic_torch_save",
]

LOSS_TERMS = ("lm_loss", "dice", "bce")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written under a temporary name in the same folder and renamed when complete.

    Lightning's own writer copies the bytes into place, so a kill during the write of `last.ckpt` can
    leave a truncated file that a resume then fails to read. Remote paths (`s3://...`) keep Lightning's
    behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


class StageCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `last.ckpt` is the newest state at each epoch's end and at the end of training,
    written into the run's own folder.

    Lightning's `save_last=True` writes `last.ckpt` only together with a top-k checkpoint of the same step.
    With `monitor: val/loss` it then stays at the best epoch when the loss stops improving, and a run that
    ends at `max_steps` inside an epoch (a resumed one, say) leaves it at the previous epoch's end, so the
    next stage's `init_from` and `--ckpt_path last` would read stale weights. Here `last.ckpt` is also
    written when no top-k checkpoint was; the top-k files keep Lightning's rules.

    Without `dirpath` the files go to the run's folder, `<save_dir>/<name>/<version>/checkpoints/` of the
    logger (`runs/stage3/version_0/checkpoints/`), and `subdir` below it (`steps/`): each run keeps its
    checkpoints beside its logs, and a new run never writes over another's. Within one folder a file of
    the same name is replaced (no `last-v1.ckpt`: `last.ckpt` is what the next stage reads).

    Args:
        subdir: a folder under the run's `checkpoints/` (with `dirpath` unset), e.g. `steps`.
        *args, **kwargs: `ModelCheckpoint`'s.
    """

    def __init__(
        self, *args: Any, subdir: str | None = None, enable_version_counter: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)
        self.subdir = None if self.dirpath is not None else subdir

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.subdir and Path(str(self.dirpath)).name != self.subdir:
            self.dirpath = str(Path(str(self.dirpath)) / self.subdir)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._every_n_epochs >= 1 and self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._every_n_epochs >= 1 and not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refresh_last(trainer)
        super().on_train_end(trainer, pl_module)

    def _refresh_last(self, trainer: Trainer) -> None:
        # the skip check also covers "already saved at this step", so a step is never written twice
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class NonFiniteError(TrainingError):
    """A training step produced a NaN or inf loss or gradient."""


class NonFiniteGuard(Callback):
    """Stop (or skip the step) when a loss term or a gradient is NaN or inf.

    The check runs after backward and before the optimizer step, so the weights are still those of
    the last good step: stopping keeps every checkpoint written so far valid, and this callback never
    writes one. A skipped step changes no weight and no optimizer state (the gradients are dropped);
    the step counter and the learning-rate schedule move on.

    Args:
        skip_limit: how many bad steps to skip in the whole run before stopping (0: stop at the first).
    """

    def __init__(self, skip_limit: int = 0) -> None:
        if skip_limit < 0:
            raise ValueError(f"skip_limit must be >= 0, got {skip_limit}")
        self.skip_limit = skip_limit
        self.skipped = 0
        self._terms: dict[str, float] = {}
        self._loss_bad = False
        self._hook: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = getattr(pl_module, "model", None)
        if stage == "fit" and isinstance(model, torch.nn.Module) and self._hook is None:
            self._hook = model.register_forward_hook(self._record_terms)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record_terms(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # Only the scalar terms, detached: holding the outputs would keep the whole graph alive.
        if isinstance(output, dict) and module.training:
            self._terms.update(
                {k: output[k].detach() for k in LOSS_TERMS if isinstance(output.get(k), torch.Tensor)}
            )

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._terms = {}

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._loss_bad = True
            self._terms.setdefault("loss", loss.detach())

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        flags = [torch.isfinite(v).all() for v in self._terms.values()] + [
            torch.isfinite(g).all() for g in grads
        ]
        # one device sync per step, not one per tensor
        bad = self._loss_bad or (bool(torch.stack(flags).all().logical_not()) if flags else False)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._loss_bad = False
        if not bad:
            return
        problem = self._problem(pl_module)
        where = (
            f"step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx})"
        )
        if self.skipped < self.skip_limit:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)
            rank_zero_warn(
                f"{problem} at {where}: step skipped ({self.skipped} of {self.skip_limit} allowed)"
            )
            return
        written = [getattr(cb, "last_model_path", "") for cb in trainer.checkpoint_callbacks]
        checkpoint = max(
            written, key=lambda p: os.path.getmtime(p) if p and os.path.exists(p) else -1.0, default=""
        )
        checkpoint = checkpoint or "none written yet"
        limit = f" after {self.skipped} skipped (skip_limit {self.skip_limit})" if self.skip_limit else ""
        raise NonFiniteError(
            f"{problem} at {where}{limit}; weights not updated, last good checkpoint: {checkpoint}"
        )

    def _problem(self, pl_module: LightningModule) -> str:
        bad_terms = [k for k, v in self._terms.items() if not bool(torch.isfinite(v).all())]
        if bad_terms:
            return "non-finite loss term " + ", ".join(f"{k}={float(self._terms[k]):g}" for k in bad_terms)
        for name, param in pl_module.named_parameters():
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                shown = ", ".join(f"{k}={float(v):.4g}" for k, v in self._terms.items()) or "none recorded"
                return f"non-finite gradient of {name} (loss terms finite: {shown})"
        return "non-finite loss or gradient on another rank"


class PreemptionCheckpoint(Callback):
    """On SIGTERM or SIGUSR1, finish the current training batch, save `last.ckpt`, and exit.

    The handler only records the signal; the checkpoint is written at the end of the batch, where the
    weights, optimizer, data position and random state agree, in the first `ModelCheckpoint`'s folder
    (else the trainer's root folder), so `--ckpt_path last` resumes from it. Under SLURM with
    `SLURMEnvironment(auto_requeue=True)` the job is requeued after SIGUSR1 (`#SBATCH --signal=SIGUSR1@90`).
    The process then exits with code 128 + the signal number.

    Args:
        signals: names of the signals to handle.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        unknown = [s for s in signals if not isinstance(getattr(signal, s, None), signal.Signals)]
        if unknown:
            raise ValueError(f"unknown signal names {unknown}")
        self.signals = tuple(signals)
        self.received: int | None = None
        self.saved_path: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum
        previous = self._previous.get(signum)
        # Lightning's SIGTERM handler stops its launcher's workers; its SLURM SIGUSR1 handler would save
        # in the middle of a step and requeue a second time, so SIGUSR1 is not passed on.
        if signum == signal.SIGTERM and callable(previous):
            previous(signum, frame)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Installed after Lightning's own handlers (registered just before training starts) and removed
        # before Lightning restores the handlers it found, so none of ours outlives the run.
        self.received = None
        try:
            for name in self.signals:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handler)
        except ValueError:  # not the main thread
            rank_zero_warn("PreemptionCheckpoint: signal handlers need the main thread; not installed")
            self._restore()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        received = self.received is not None
        if trainer.world_size > 1:
            # every rank must take part in the save, whichever ones the signal reached
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        signum = self.received or signal.SIGTERM
        self.saved_path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(self.saved_path)
        rank_zero_info(
            f"signal {signal.Signals(signum).name}: saved {self.saved_path} at step {trainer.global_step}"
        )
        if signum == getattr(signal, "SIGUSR1", None):
            self._requeue(trainer)
        raise SIGTERMException(128 + int(signum))

    @staticmethod
    def checkpoint_path(trainer: Trainer) -> str:
        """`last.ckpt` in the first ModelCheckpoint's folder, else in the trainer's root folder."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
                return str(Path(callback.dirpath) / name)
        return str(Path(trainer.default_root_dir) / "last.ckpt")

    @staticmethod
    def _requeue(trainer: Trainer) -> None:
        environment = getattr(trainer, "_accelerator_connector", None)
        environment = getattr(environment, "cluster_environment", None)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        job = os.environ.get("SLURM_JOB_ID")
        if "SLURM_ARRAY_JOB_ID" in os.environ:
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        if trainer.is_global_zero and job:
            result = subprocess.call(["scontrol", "requeue", job])
            rank_zero_info(f"scontrol requeue {job}: exit code {result}")


class PredictionWriter(BasePredictionWriter):
    """The records `predict_step` returns, written to one JSON Lines file when predicting ends.

    `m3d-lit predict -c ...` (LightningCLI) adds it when no prediction writer is configured. Under DDP
    each rank writes its own share to `predictions.rank<N>.jsonl`.

    Args:
        path: the file (default: `predictions.jsonl` in the trainer's log folder).
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        rows = list(_records(predictions))
        path = Path(self.path or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl")
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        write_jsonl(path, rows)
        print(f"m3d-lit predict: wrote {len(rows)} predictions to {path}", flush=True)


def _records(node: Any) -> Any:
    """The records of `predict_step`'s outputs, however Lightning nests them (per dataloader, per batch)."""
    if isinstance(node, dict):
        yield node
    else:
        for item in node or ():
            yield from _records(item)
