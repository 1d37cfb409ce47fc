"""The bundle of a checkpoint written before bundles existed: read from what it has, with what is assumed.

Such a checkpoint names its task class and holds the task's hyperparameters (preset, overrides,
`llm_path`, `trainable`, stage 3's LoRA and loss weights), a fingerprint of its configuration and, when
its DataModule had them, one size and window. The model those describe is the one the task built; the
notes say what could not be read and what stands in for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from m3d_lit.errors import InputError
from m3d_lit.inference.bundle import DEFAULT_WINDOW, Bundle, SourcePreprocessing, TokenizerRecord
from m3d_lit.models.overrides import apply_overrides
from m3d_lit.models.presets import STAGE_TRAINABLE, fingerprint_config, resolve

__all__ = ["legacy_bundle"]

STAGES = {"ClipTask": 1, "AlignTask": 2, "FinetuneTask": 3}
SOURCE = "data"  # the one source an older checkpoint's preprocessing stands for


def _stage(path: Path, record: dict[str, Any]) -> int:
    task = record.get("task")
    if not isinstance(task, str) or not task.startswith("m3d_lit."):
        raise InputError(path, "is not an m3d-lit checkpoint (no m3d_lit record naming its task)")
    stage = STAGES.get(task.rsplit(".", 1)[-1])
    if stage is None:
        raise InputError(path, f"names task {task!r}, which this version of m3d-lit does not know")
    return stage


def _check_config(path: Path, record: dict[str, Any], preset: str, overrides: Any) -> None:
    """The configuration the hyperparameters give must be the one the checkpoint's fingerprint hashed."""
    saved = (record.get("base") or {}).get("config")
    if saved is None:
        return
    config = fingerprint_config(preset, overrides)
    if hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16] != saved:
        raise InputError(path, f"was made with another configuration of preset {preset!r} (overrides differ)")


def legacy_bundle(checkpoint: dict[str, Any], path: Path) -> Bundle:
    """The bundle of an older m3d-lit checkpoint (module docstring); `InputError` for anything else."""
    record = checkpoint.get("m3d_lit") or {}
    stage = _stage(path, record)
    params = checkpoint.get("hyper_parameters") or {}
    preset, overrides = params.get("preset", "tiny"), params.get("overrides")
    _check_config(path, record, preset, overrides)
    config = resolve(preset, overrides)
    if stage == 3:  # `FinetuneTask.run_settings`: the run's LoRA and loss weights over the preset
        settings: dict[str, Any] = {
            "loss": {k: params[k] for k in ("w_dice", "w_bce") if params.get(k) is not None}
        }
        if params.get("lora") is not None:
            settings["lora"] = params["lora"]
        config = apply_overrides(config, settings)
    trainable = {**STAGE_TRAINABLE[stage], **(params.get("trainable") or {})}
    old = record.get("preprocessing") or {}
    window, size = old.get("window"), old.get("size")
    notes = [f"{path} was written by an older m3d-lit without a model record: rebuilt from its "
             f"hyperparameters (stage {stage}, preset {preset!r})"]  # fmt: skip
    if window is None:
        notes.append(f"it records no CT window: scans are read with {DEFAULT_WINDOW!r} (assumed)")
    size = size if size is not None else list(config.img_size)
    llm_path = params.get("llm_path")
    return Bundle(
        kind="clip" if stage == 1 else "lamed",
        config=config.to_dict(),
        # not recorded: the tokenizer that the configuration builds now stands in for it
        tokenizer=TokenizerRecord(llm_path, 0, ""),
        llm_path=None if stage == 1 or llm_path is None else str(llm_path),
        llm_weights=((record.get("base") or {}).get("llm") or {}).get("weights_bf16"),
        text_path=params.get("text_path") if stage == 1 else None,
        text_max_length=params.get("text_max_length", 128) if stage == 1 else None,
        lora=config.lora.to_dict() if stage > 1 and trainable.get("llm") == "lora" else None,
        preprocessing={SOURCE: SourcePreprocessing.from_dict({"size": size, "window": window})},
        task=record.get("task"),
        version="older than bundles",
    ).with_notes(*notes)
