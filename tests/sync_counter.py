"""A callback that counts, per training step, the operations that make the host wait for the device.

Used by `test_no_host_sync.py` through a trainer overlay. It watches every ATen operation of the
training loop (a `TorchDispatchMode`) for the ones whose result the host must read: `item`, `bool()`,
`float()` and `int()` of a tensor (all `aten._local_scalar_dense`), `nonzero` (also behind boolean-mask
indexing) and `masked_select`, and wraps `Tensor.tolist`, which reads CPU memory without an ATen call, and
`Tensor.cpu`, the explicit copy to the host (its result is marked `HostTensor`: reading it is free).
A step's window runs from its `on_train_batch_start` to the next one (or the end of training), so the
other callbacks' batch-end hooks and Lightning's logging count too. Each call is recorded with the
innermost frame of m3d_lit or Lightning that made it, and the three innermost frames.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}


_PLUMBING = (
    "sync_counter",
    "/torch/_dynamo/",
    "/torch/utils/_python_dispatch",
    "/torch/_compile",
    "/torch/_tensor",
)


def _frames() -> list[traceback.FrameSummary]:
    """The stack without this module's frames and torch's dispatch plumbing, innermost last."""
    return [f for f in traceback.extract_stack() if not any(p in f.filename for p in _PLUMBING)]


def _caller() -> str:
    frames = _frames()
    inside = [f for f in frames if "/m3d_lit/" in f.filename or "/lightning/" in f.filename]
    frame = (inside or frames)[-1]
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:]))
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.line} [{where}]"


class HostTensor(torch.Tensor):
    """A tensor the code moved to the host with `Tensor.cpu` (on a GPU that copy is the wait, made where
    the code chose to make it). Reading it later does not wait for the device, so it is not counted; on
    this CPU-only machine the mark is the only way to tell it from a device tensor. Clones of it keep the
    mark; a deep copy (Lightning's checkpoint callbacks copy the logged values) is a plain tensor."""

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone()


class _Watch(TorchDispatchMode):
    def __init__(self, record: Any) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in SYNCING and not isinstance(args[0], HostTensor):
            self.record(func.__name__)
        return func(*args, **(kwargs or {}))


class SyncCounter(Callback):
    """Writes `{"log_every_n_steps": n, "steps": [{"step": s, "calls": [...]}, ...]}` to `out`."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.steps: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.log_every = 0
        self._mode: _Watch | None = None
        self._tolist: Any = None

    def _record(self, what: str) -> None:
        if self.current is None:
            return
        caller = _frames()[-1].filename
        # Not the device's: torch's optimizers keep their step counts on the host (unless capturable or
        # fused), and m3d_lit.data only ever holds host tensors (the sampler's order, the collator's rows).
        if "/torch/optim/" in caller or "/m3d_lit/data/" in caller:
            return
        self.current["calls"].append(f"{what} at {_caller()}")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.log_every = trainer.log_every_n_steps
        self._tolist, self._cpu = torch.Tensor.tolist, torch.Tensor.cpu
        tolist_, cpu_ = self._tolist, self._cpu

        def tolist(tensor: torch.Tensor) -> Any:
            if self._wait(tensor):
                self._record("tolist")
            return tolist_(tensor)

        def cpu(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self._wait(tensor):
                self._record("cpu")
            return cpu_(tensor, *args, **kwargs).as_subclass(HostTensor)

        torch.Tensor.tolist, torch.Tensor.cpu = tolist, cpu  # type: ignore[method-assign]
        self._mode = _Watch(self._record)
        self._mode.__enter__()

    @staticmethod
    def _wait(tensor: torch.Tensor) -> bool:
        return not isinstance(tensor, HostTensor)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._close()
        self.current = {"step": trainer.global_step, "calls": []}

    def _close(self) -> None:
        if self.current is not None:
            self.steps.append(self.current)
        self.current = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            torch.Tensor.tolist, torch.Tensor.cpu = self._tolist, self._cpu  # type: ignore[method-assign]
            self._mode = None
        Path(self.out).write_text(json.dumps({"log_every_n_steps": self.log_every, "steps": self.steps}))
