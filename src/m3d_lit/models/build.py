"""Building `LamedModel`: from a preset, or from an official M3D-LaMed directory (`models/official/`).

Apart from `lamed.py` so that the official loader, which builds a `LamedModel`, and the composite model
import each other in one direction only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from m3d_lit.errors import InputError
from m3d_lit.models.lamed import LamedModel
from m3d_lit.models.official.lamed import build_official_lamed, is_official_lamed
from m3d_lit.models.presets import resolve

__all__ = ["build_lamed"]


def build_lamed(
    preset: str,
    overrides: dict[str, Any] | None = None,
    llm_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LamedModel:
    """Build `LamedModel` from a preset (all parameters trainable until `set_trainable`).

    Args:
        preset: `tiny`, `small` or `paper`.
        overrides: nested values deep-merged into the preset; an `llm` section with `llm_path`, or any
            with an official directory, is refused (it would be ignored).
        llm_path: local LLM directory (weights + tokenizer); None builds from the preset. An official
            M3D-LaMed directory builds that whole model instead (the preset is not used).
        device: where parameters are created (None: the default device, which Lightning's
            `configure_model` sets to the rank's own); `"meta"` builds without memory or reading weights.
        dtype: weight dtype of the LLM (from `llm_path`, or built at random), or of every weight of an
            official directory: a frozen LLM is made in its training dtype at once.
    """
    if llm_path is not None and is_official_lamed(llm_path):
        if overrides:
            raise InputError(
                "overrides",
                f"{json.dumps(overrides)} would be ignored: an M3D-LaMed directory ({llm_path}) builds the "
                "whole model from its own config.json; remove them",
            )
        if device is None:
            return build_official_lamed(llm_path, dtype)
        with torch.device(device):
            return build_official_lamed(llm_path, dtype)
    if llm_path is not None and (overrides or {}).get("llm"):
        raise InputError(
            "overrides.llm",
            f"{json.dumps(overrides['llm'])} would be ignored: the LLM is loaded from llm_path {llm_path} "
            "with its own config.json; remove them",
        )
    config = resolve(preset, overrides)
    if device is None:
        return LamedModel(config, llm_path, dtype)
    with torch.device(device):
        return LamedModel(config, llm_path, dtype)
