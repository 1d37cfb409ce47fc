"""One door to every kind of trained model: a model built from its bundle, with its weights, frozen.

`load_model(path)` takes what `resolve_checkpoint` resolves (a Lightning checkpoint, a run or stage
folder, an official M3D-LaMed or M3D-CLIP directory, an `m3d-lit export` folder) and returns the model
in eval mode with its `Bundle` and where it came from. A Lightning checkpoint is rebuilt from its bundle
alone (no training task); one written before bundles existed from its hyperparameters
(`inference/legacy.py`), saying what was assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m3d_lit.errors import InputError
from m3d_lit.inference.build import build_model
from m3d_lit.inference.bundle import (
    OFFICIAL_WINDOW,
    Bundle,
    SourcePreprocessing,
    TokenizerRecord,
    code_version,
    llm_weights_hash,
)
from m3d_lit.inference.checkpoints import (
    EXPORT_MANIFEST,
    file_sha256,
    is_checkpoint_folder,
    read_checkpoint,
    resolve_checkpoint,
    run_of,
)
from m3d_lit.inference.export_folder import load_export
from m3d_lit.inference.legacy import legacy_bundle
from m3d_lit.models.official.clip import is_m3d_clip, load_m3d_clip
from m3d_lit.models.official.files import read_config
from m3d_lit.models.official.lamed import FAMILIES, build_official_lamed, is_official_lamed

__all__ = ["Loaded", "ModelSource", "load_model"]

MODEL_PREFIX = "model."  # the training task's state-dict keys of the model


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from."""

    path: Path
    """The checkpoint file, or the official / export directory."""
    kind: str
    """`checkpoint`, `official` (M3D-LaMed or M3D-CLIP directory) or `export`."""
    given: Path
    """What the user named (a run or stage folder resolves to a file)."""
    how: str | None = None
    """Which checkpoint a run or stage folder gave, in words."""
    global_step: int | None = None
    """The training step of a Lightning checkpoint."""

    @property
    def run(self) -> Path | None:
        """The run folder (`runs/<stage>/<run>/`) of a checkpoint file, if it lies in one."""
        return run_of(self.path) if self.kind == "checkpoint" else None

    def describe(self) -> dict[str, Any]:
        """The provenance `metrics.json` and `report.md` record (the sha256 reads the whole file)."""
        run = None if self.run is None else str(self.run)
        return {"path": str(self.path), "kind": self.kind, "sha256": file_sha256(self.path), "run": run,
                "global_step": self.global_step}  # fmt: skip


@dataclass
class Loaded:
    """A model ready for inference, its bundle and its source."""

    model: nn.Module
    bundle: Bundle
    source: ModelSource
    notes: list[str] = field(default_factory=list)
    """What a user should read: which checkpoint a folder gave, what an older checkpoint assumed."""

    def provenance(self) -> dict[str, Any]:
        """Which model, exactly, and which m3d-lit trained and now runs it, with the date (UTC)."""
        version, commit = code_version()
        return {
            **self.source.describe(),
            "given": str(self.source.given),
            "trained_with": {"version": self.bundle.version, "commit": self.bundle.commit},
            "run_with": {"version": version, "commit": commit},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def load_model(path: str | Path, kind: str | None = None, device: str | torch.device = "cpu") -> Loaded:
    """The model `path` names, frozen and in eval mode, on `device` (its dtype as saved, float32).

    Args:
        path: a checkpoint, a run or stage folder, an official directory or an export folder.
        kind: `lamed` or `clip` when the caller needs one of them (another kind is refused in one line).
        device: where the weights go.
    """
    resolved = resolve_checkpoint(path)
    target = resolved.path
    if target.is_dir() and (target / EXPORT_MANIFEST).is_file():
        model, bundle = load_export(target)
        source = ModelSource(target, "export", resolved.given, resolved.how)
    elif target.is_dir() and not is_checkpoint_folder(target):
        model, bundle = _load_official(target, kind)
        source = ModelSource(target, "official", resolved.given, resolved.how)
    else:
        model, bundle, step = _load_lightning(target)
        source = ModelSource(target, "checkpoint", resolved.given, resolved.how, step)
    if kind is not None and bundle.kind != kind:
        raise InputError(path, _wrong_kind(bundle.kind, kind))
    model.requires_grad_(False)
    notes = [n for n in (resolved.how, *bundle.notes) if n]
    return Loaded(model.to(device).eval(), bundle, source, notes)


def _wrong_kind(found: str, wanted: str) -> str:
    if found == "clip":
        return "is a stage-1 (CLIP) model: it cannot answer questions; give a stage-2 or stage-3 checkpoint"
    return "is a stage-2/3 (LaMed) model, but this needs a stage-1 (CLIP) checkpoint or an M3D-CLIP directory"


def _load_official(path: Path, kind: str | None) -> tuple[nn.Module, Bundle]:
    """An official directory, its kind checked before anything is loaded."""
    model_type = read_config(path).get("model_type")  # raises for a config.json that is not a JSON object
    if is_m3d_clip(path):
        if kind == "lamed":
            raise InputError(path, "is an M3D-CLIP directory: it cannot answer questions (give M3D-LaMed's)")
        model = load_m3d_clip(path)
        return model, _official_bundle(model, "clip", path, model.max_length)
    if kind == "clip":
        raise InputError(path, f"holds a {model_type!r} model, not M3D-CLIP (model_type 'm3d_clip')")
    if not is_official_lamed(path):
        raise InputError(
            path,
            f"is neither an m3d-lit checkpoint nor an official M3D-LaMed or M3D-CLIP directory: its "
            f"config.json has model_type {model_type!r}, not one of {sorted(FAMILIES)}",
        )
    model = build_official_lamed(path)
    return model, _official_bundle(model, "lamed", path, None)


def _official_bundle(model: Any, kind: str, path: Path, text_max_length: int | None) -> Bundle:
    tokenizer = model.text_tokenizer if kind == "clip" else model.tokenizer
    size = tuple(int(s) for s in model.img_size)
    return Bundle(
        kind=kind,
        config=model.config.to_dict(),
        tokenizer=TokenizerRecord.of(tokenizer, path),
        llm_path=str(path) if kind == "lamed" else None,
        text_max_length=text_max_length,
        # M3D min-maxes its volumes over their whole range (`OFFICIAL_WINDOW`)
        preprocessing={"m3d": SourcePreprocessing(size, OFFICIAL_WINDOW)},  # type: ignore[arg-type]
        version="official",
    )


def _load_lightning(path: Path) -> tuple[nn.Module, Bundle, int | None]:
    checkpoint = read_checkpoint(path)
    record = checkpoint.get("m3d_lit") or {}
    saved = record.get("bundle")
    bundle = Bundle.from_dict(saved, path) if isinstance(saved, dict) else legacy_bundle(checkpoint, path)
    model = build_model(bundle, path)
    if bundle.llm_path is not None and bundle.llm_weights is not None:
        if llm_weights_hash(model.llm) != bundle.llm_weights:
            raise InputError(
                path,
                f"its base LLM ({bundle.llm_path}) now holds other weights than the ones it was trained "
                "on: restore that directory",
            )
    state = {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in (checkpoint.get("state_dict") or {}).items()
        if key.startswith(MODEL_PREFIX)
    }
    omitted = {key.removeprefix(MODEL_PREFIX) for key in record.get("omitted") or ()}
    _load_state(model, state, omitted, path)
    step = checkpoint.get("global_step")
    return model, bundle, None if step is None else int(step)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], omitted: set[str], path: Path) -> None:
    """Load every saved weight strictly; only the frozen LLM weights the checkpoint omits stay as built."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: made with another configuration
        raise InputError(path, f"weights do not fit the model it describes: {str(err)[:300]}") from err
    missing = [key for key in result.missing_keys if key not in omitted]
    if missing or result.unexpected_keys:
        raise InputError(
            path,
            f"does not match the model it describes ({len(missing)} missing, {len(result.unexpected_keys)} "
            f"unexpected weights, e.g. {(missing or result.unexpected_keys)[:2]}): a damaged file?",
        )
