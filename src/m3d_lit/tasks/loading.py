"""Rebuild a trained task from its checkpoint, for evaluation, asking and export."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from m3d_lit.errors import InputError
from m3d_lit.tasks.base import BaseTask, load_checkpoint

__all__ = ["load_task"]


def _task_class(path: Path, checkpoint: dict[str, Any]) -> type[BaseTask]:
    name = (checkpoint.get("m3d_lit") or {}).get("task")
    if not isinstance(name, str) or "." not in name:
        raise InputError(path, "is not an m3d-lit checkpoint (no m3d_lit.task entry)")
    module, _, qualname = name.rpartition(".")
    if not module.startswith("m3d_lit."):
        raise InputError(path, f"names task {name!r}, outside m3d_lit: refused")
    cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseTask)):
        raise InputError(path, f"names task {name!r}, which does not exist in this version of m3d-lit")
    return cls


def load_task(path: str | Path, device: str = "cpu") -> tuple[BaseTask, dict[str, Any]]:
    """The task of a checkpoint with its weights, in eval mode, and the checkpoint's m3d_lit record."""
    path = Path(path)
    checkpoint = load_checkpoint(path)
    cls = _task_class(path, checkpoint)
    accepted = set()
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, BaseTask):
            accepted |= set(inspect.signature(klass.__init__).parameters)
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k in accepted}
    hparams["init_from"] = None
    task = cls(**hparams)
    state = checkpoint.get("state_dict") or {}
    try:
        result = task.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: made with another preset
        raise InputError(path, f"weights do not fit the model it names: {str(err)[:300]}") from err
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            path,
            f"does not match the model it names ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected weights, e.g. "
            f"{(result.missing_keys or result.unexpected_keys)[:2]}): another preset or a damaged file",
        )
    return task.to(device).eval(), checkpoint["m3d_lit"]
