"""Parameter counts of a preset, without loading weights (`m3d-lit describe`).

Everything is built on the meta device, so the paper preset (a 7B LLM) costs no memory. `describe`
returns `{"components": {name: {"params", "trainable"}}, "patch_tokens", "visual_tokens",
"total_params", "trainable_params", "preset", "stage"}`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from m3d_lit.errors import InputError
from m3d_lit.models.build import build_lamed
from m3d_lit.models.clip import build_clip
from m3d_lit.models.config import ModelConfig
from m3d_lit.models.presets import STAGE_TRAINABLE, resolve
from m3d_lit.models.registry import build_perceiver
from m3d_lit.models.vision import grid_size

__all__ = ["describe"]


def _count(params: Iterable[nn.Parameter]) -> dict[str, int]:
    params = list(params)
    return {
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def _token_counts(config: ModelConfig) -> tuple[int, int]:
    """(patch tokens, visual tokens) of a resolved preset."""
    grid = grid_size(config.img_size, config.patch_size)
    with torch.device("meta"):
        perceiver = build_perceiver(config.perceiver.to_dict(), grid, 8, 8)
    return grid[0] * grid[1] * grid[2], int(perceiver.num_tokens)


def _clip_components(preset: str, overrides: dict[str, Any] | None) -> dict[str, dict[str, int]]:
    with torch.device("meta"):
        model = build_clip(preset, overrides)
        model.set_trainable(STAGE_TRAINABLE[1])
    projections = [*model.image_proj.parameters(), *model.text_proj.parameters(), model.logit_scale]
    return {
        "vision": _count(model.vision.parameters()),
        "text": _count(model.text.parameters()),
        "projections": _count(projections),
    }


def _lamed_components(preset: str, stage: int, overrides: dict[str, Any] | None) -> dict[str, dict[str, int]]:
    with torch.device("meta"):  # LoRA adapters too: set_trainable creates them
        model = build_lamed(preset, overrides)
        model.set_trainable(STAGE_TRAINABLE[stage])
    llm = [p for n, p in model.llm.named_parameters() if "lora_" not in n]
    lora = [p for n, p in model.llm.named_parameters() if "lora_" in n]
    components = {
        "vision": _count(model.vision.parameters()),
        "perceiver": _count(model.perceiver.parameters()),
        "llm": _count([*llm, *model.new_tokens.parameters()]),
        "segmentation": _count([*model.segmentation.parameters(), *model.seg_head.parameters()]),
    }
    if lora:
        components["lora"] = _count(lora)
    return components


def describe(preset: str, stage: int = 3, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameter counts of `preset` with the trainability of `stage` (1: CLIP model, 2-3: LaMed)."""
    if stage not in STAGE_TRAINABLE:
        raise InputError("stage", f"{stage} must be one of {sorted(STAGE_TRAINABLE)}")
    config = resolve(preset, overrides)
    if stage == 1:
        components = _clip_components(preset, overrides)
    else:
        components = _lamed_components(preset, stage, overrides)
    patches, visual = _token_counts(config)
    return {
        "preset": preset,
        "stage": stage,
        "components": components,
        "patch_tokens": patches,
        "visual_tokens": visual,
        "total_params": sum(c["params"] for c in components.values()),
        "trainable_params": sum(c["trainable"] for c in components.values()),
    }
