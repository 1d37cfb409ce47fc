"""Reliability pieces of a training run: atomic checkpoint files, a `last.ckpt` that holds the newest state,
a guard against non-finite steps, and a checkpoint saved when the job is told to stop (SIGTERM, SIGUSR1);
and `PredictionWriter`, the predictions of LightningCLI's `predict` as one JSONL file.

They are listed in the stage recipes (`stages/*.yaml`): `AtomicCheckpointIO` under `trainer.plugins`,
`StageCheckpoint`, `NonFiniteGuard` and `PreemptionCheckpoint` under `trainer.callbacks`.
"""

from __future__ import annotations

import math
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
    """Stop (or skip steps) when a loss term or a gradient is NaN or inf, without making steps wait.

    Each step only compares on the device: whether the recorded loss terms and every gradient's norm are
    finite (a gradient whose norm overflows counts as non-finite), kept with the first bad step's values.
    The host reads that record (one wait for the device, one collective under DDP) at a check: every
    `check_every_n_steps` steps (default: the trainer's log interval, where Lightning waits for the
    device anyway), at the end of training, and before any checkpoint is written (a checkpoint asks for
    this callback's state first). A check that finds a bad step refuses to write, so no checkpoint ever
    holds a state after one. What a bad step does until its check:

    - With an optimizer that can skip a step on the device (torch's Adam, AdamW, SGD, Adagrad with
      `fused: true`), a step whose gradients are not finite changes no weight and no optimizer state
      (the learning-rate schedule moves on). The check counts such steps as skipped and stops the run
      once more than `skip_limit` were skipped in the whole run.
    - Otherwise, with `skip_limit` 0, the bad update is applied and the run stops at the next check: the
      weights in memory from the bad step on are never saved, and the error names the last checkpoint.
    - Otherwise, with `skip_limit` > 0, every step is checked on the host as it happens (one wait per
      step), so that a bad step can be dropped before the optimizer applies it.

    Args:
        skip_limit: how many bad steps to skip in the whole run before stopping (0: stop at the first).
        check_every_n_steps: steps between checks (None: the trainer's `log_every_n_steps`).
    """

    def __init__(self, skip_limit: int = 0, check_every_n_steps: int | None = None) -> None:
        if skip_limit < 0:
            raise ValueError(f"skip_limit must be >= 0, got {skip_limit}")
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.skip_limit = skip_limit
        self.check_every_n_steps = check_every_n_steps
        self.skipped = 0
        self._terms: dict[str, torch.Tensor] = {}
        self._hook: Any = None
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._pending: dict[str, Any] | None = None  # the device-side record since the last check
        self._where: dict[int, str] = {}  # step -> "epoch E, batch B", for the steps since the last check
        self._checked_at = -1

    def state_dict(self) -> dict[str, Any]:
        # the first thing a checkpoint asks for: nothing is written past an unchecked bad step
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            self._check(trainer)
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = getattr(pl_module, "model", None)
        if stage == "fit" and isinstance(model, torch.nn.Module) and self._hook is None:
            self._hook = model.register_forward_hook(self._record_terms)
        self._trainer = trainer
        self._params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for optimizer in getattr(trainer, "optimizers", []):
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf

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
        self._terms["loss"] = loss.detach()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        device = pl_module.device
        zero = torch.zeros((), device=device)
        grads = [zero if p.grad is None else p.grad for _, p in self._params]
        grads_ok = torch.stack(torch._foreach_norm(grads)).isfinite() if grads else ~zero.bool().reshape(1)
        terms = {k: v.double().reshape(()) for k, v in self._terms.items()}
        terms_ok = torch.stack([v.isfinite() for v in terms.values()]).all() if terms else ~zero.bool()
        grads_bad = ~grads_ok.all()  # the same on every rank: DDP has averaged the gradients
        bad = grads_bad | ~terms_ok
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = grads_bad.float()  # the fused step skips itself on the device
        elif self.skip_limit > 0:
            self._check_now(trainer, optimizer, bad, {"terms": terms, "grads_ok": grads_ok})
            return
        self._remember(trainer, bad, grads_bad, grads_ok, terms)

    def _remember(
        self, trainer: Trainer, bad: torch.Tensor, skipped: torch.Tensor, grads_ok: torch.Tensor, terms: dict
    ) -> None:
        step = trainer.global_step
        self._where[step] = f"epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}"
        old = self._pending
        if old is None:
            self._pending = {
                "first": torch.where(bad, step, -1),
                "skipped": skipped.long(),
                "grads_ok": grads_ok,
                "terms": terms,
            }
            return
        first = bad & (old["first"] < 0)
        old["first"] = torch.where(first, step, old["first"])
        old["skipped"] = old["skipped"] + skipped.long()
        old["grads_ok"] = torch.where(first, grads_ok, old["grads_ok"])
        old["terms"] = {k: torch.where(first, v, old["terms"].get(k, v)) for k, v in terms.items()}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.check_every_n_steps or max(1, trainer.log_every_n_steps)
        if trainer.global_step % every == 0 and trainer.global_step != self._checked_at:
            self._check(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: Trainer) -> None:
        """Read the record since the last check (agreed over all ranks) and stop or count skips."""
        self._checked_at = trainer.global_step
        pending, where, self._pending, self._where = self._pending, self._where, None, {}
        if pending is None and trainer.world_size == 1:
            return
        if pending is None:  # this rank saw no step since the last check; the others may have
            pending = {"first": torch.tensor(-1), "skipped": torch.tensor(0), "grads_ok": None, "terms": {}}
        big = 2**62  # "no bad step": the most negative value, so that max() picks a real one
        first = pending["first"].to(trainer.strategy.root_device)
        summary = torch.stack([torch.where(first < 0, -big, -first), pending["skipped"].to(first.device)])
        if trainer.world_size > 1:
            summary = trainer.strategy.reduce(summary, reduce_op="max")
        minus_first, skipped = summary.tolist()
        if minus_first == -big:
            return
        self.skipped += int(skipped)
        step = -int(minus_first)
        problem = self._problem(pending)
        at = f"step {step} ({where.get(step, 'on another rank')})"
        device_skips = any(getattr(o, "_step_supports_amp_scaling", False) for o in trainer.optimizers)
        if device_skips and self.skipped <= self.skip_limit:
            rank_zero_warn(
                f"{problem} at {at}: {int(skipped)} step(s) skipped on the device since the last check "
                f"({self.skipped} of {self.skip_limit} allowed)"
            )
            return
        if device_skips:
            outcome = f"its update was skipped; {self.skipped} skipped in all (skip_limit {self.skip_limit})"
        else:
            outcome = (
                f"found at the check after step {trainer.global_step - 1}; the weights since are not saved"
            )
        raise NonFiniteError(f"{problem} at {at}: {outcome}; last good checkpoint: {_last_written(trainer)}")

    def _check_now(
        self, trainer: Trainer, optimizer: torch.optim.Optimizer, bad: torch.Tensor, record: dict[str, Any]
    ) -> None:
        """One step checked on the host as it happens (`skip_limit` > 0 without a fused optimizer)."""
        flag = bool(bad)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        if not flag:
            return
        problem = self._problem(record) if bool(bad) else "non-finite loss or gradient on another rank"
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
        raise NonFiniteError(
            f"{problem} at {where} after {self.skipped} skipped (skip_limit {self.skip_limit}); weights not "
            f"updated, last good checkpoint: {_last_written(trainer)}"
        )

    def _problem(self, pending: dict[str, Any]) -> str:
        terms = {k: float(v) for k, v in pending["terms"].items()}
        bad_terms = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad_terms:
            return "non-finite loss term " + ", ".join(f"{k}={terms[k]:g}" for k in bad_terms)
        if pending["grads_ok"] is not None:
            for (name, _), ok in zip(self._params, pending["grads_ok"].tolist()):
                if not ok:
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) or "none recorded"
                    return f"non-finite gradient of {name} (loss terms finite: {shown})"
        return "non-finite loss or gradient on another rank"


def _last_written(trainer: Trainer) -> str:
    """The newest checkpoint file a checkpoint callback has written, or a note that there is none."""
    written = [getattr(cb, "last_model_path", "") for cb in trainer.checkpoint_callbacks]
    newest = max(written, key=lambda p: os.path.getmtime(p) if p and os.path.exists(p) else -1.0, default="")
    return newest or "none written yet"


class PreemptionCheckpoint(Callback):
    """On SIGTERM or SIGUSR1, finish the current training batch, save `last.ckpt`, and exit.

    The handler only records the signal; the checkpoint is written at the end of the batch, where the
    weights, optimizer, data position and random state agree, in the first `ModelCheckpoint`'s folder
    (else the trainer's root folder), so `--ckpt_path last` resumes from it. Under SLURM with
    `SLURMEnvironment(auto_requeue=True)` the job is requeued after SIGUSR1 (`#SBATCH --signal=SIGUSR1@90`).
    The process then exits with code 128 + the signal number.

    Under DDP the ranks agree on whether any of them got a signal (a collective, which waits for the
    device) every `check_every_n_steps` steps, so the save comes at most that many batches after the
    signal; SLURM's `--signal=SIGUSR1@90` leaves 90 s for it. One process checks its flag every batch.

    Args:
        signals: names of the signals to handle.
        check_every_n_steps: under DDP, steps between the ranks' agreements (None: the trainer's
            `log_every_n_steps`, where Lightning waits for the device anyway).
    """

    def __init__(
        self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), check_every_n_steps: int | None = None
    ) -> None:
        unknown = [s for s in signals if not isinstance(getattr(signal, s, None), signal.Signals)]
        if unknown:
            raise ValueError(f"unknown signal names {unknown}")
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
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
            every = self.check_every_n_steps or max(1, trainer.log_every_n_steps)
            if trainer.global_step % every:
                return
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
