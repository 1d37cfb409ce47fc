"""Rebuild a trained task from its checkpoint or an official M3D directory, for eval, ask, bench, export.

`load_task` reads what `tasks/checkpoints.py` made the checkpoint record (the task's class, the base
model's fingerprint) and loads every weight strictly; an official M3D-LaMed directory becomes a frozen
stage-3 `FinetuneTask` (`tasks/official.py`), an M3D-CLIP directory a CLIP model (`load_clip`).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, NamedTuple

from m3d_lit.errors import InputError
from m3d_lit.models.official.clip import is_m3d_clip, load_m3d_clip
from m3d_lit.models.official.files import read_config
from m3d_lit.models.official.lamed import FAMILIES
from m3d_lit.tasks.base import BaseTask, load_checkpoint
from m3d_lit.tasks.checkpoints import restore_frozen_base
from m3d_lit.tasks.finetune import FinetuneTask
from m3d_lit.tasks.official import OFFICIAL_WINDOW, official_kind, scan_window

__all__ = ["LoadedClip", "load_clip", "load_official_task", "load_task"]

FROZEN = {k: "frozen" for k in ("vision", "perceiver", "llm", "segmentation", "new_token_rows")}


def load_official_task(path: Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(task in eval mode, its record) for an official directory; `InputError` for any other folder."""
    if official_kind(path) is None:
        config = read_config(path)  # raises for a config.json that is not a JSON object
        raise InputError(
            path,
            f"is neither an m3d-lit checkpoint (a .ckpt file) nor an official M3D-LaMed directory: its "
            f"config.json has model_type {config.get('model_type')!r}, not one of {sorted(FAMILIES)}",
        )
    task = FinetuneTask(llm_path=str(path), trainable=dict(FROZEN), log_examples=0)
    task.configure_model()
    record = {"task": f"{FinetuneTask.__module__}.FinetuneTask", "preprocessing": None, "official": str(path)}
    return task.to(device).eval(), record


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
    """The task of a checkpoint with its weights, in eval mode, and the checkpoint's m3d_lit record
    (with the checkpoint's `global_step` added). A directory with a config.json is read as an official
    M3D model (`tasks/official.py`).
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return load_official_task(path, device)
    checkpoint = load_checkpoint(path)
    cls = _task_class(path, checkpoint)
    accepted = set()
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, BaseTask):
            accepted |= set(inspect.signature(klass.__init__).parameters)
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k in accepted}
    hparams["init_from"] = None
    task = cls(**hparams)
    task.configure_model()
    restore_frozen_base(path, checkpoint, task)
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
    return task.to(device).eval(), {**checkpoint["m3d_lit"], "global_step": checkpoint.get("global_step")}


class LoadedClip(NamedTuple):
    """A CLIP model with the text limit and CT window it was trained with."""

    model: Any
    max_length: int
    window: str


def load_clip(path: Path, device: str = "cpu") -> LoadedClip:
    """The CLIP model of a stage-1 checkpoint or an M3D-CLIP directory."""
    path = Path(path)
    if path.is_dir():
        if is_m3d_clip(path):
            model = load_m3d_clip(path).to(device)
            return LoadedClip(model, model.max_length, OFFICIAL_WINDOW)
        kind = read_config(path).get("model_type")
        raise InputError(path, f"holds a {kind!r} model, not M3D-CLIP (model_type 'm3d_clip')")
    task, meta = load_task(path, device=device)
    if not hasattr(task.model, "encode_text"):
        raise InputError(
            path,
            f"holds a {type(task).__name__}, but this needs a stage-1 (CLIP) checkpoint "
            "or an M3D-CLIP directory",
        )
    return LoadedClip(task.model, int(task.hparams.text_max_length), scan_window(meta))
