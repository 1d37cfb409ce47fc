"""Parameter counts of a preset, without loading weights (`m3d-lit describe`).

Everything is built on the meta device, so the paper preset (a 7B LLM) costs no memory, and an official
M3D-LaMed directory is read for its config, weight shapes and tokenizer only. `describe` returns
`{"components": {name: {"params", "trainable"}}, "patch_tokens", "visual_tokens", "total_params",
"trainable_params", "preset", "model", "stage", "input", "max_length", "llm"}`: `input` the image the
model takes (`channels`, `img_size` D x H x W, `patch_size`), `llm` (or `text` for stage 1) the sizes of
its language part.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m3d_lit.errors import InputError
from m3d_lit.models.build import build_lamed
from m3d_lit.models.clip import build_clip
from m3d_lit.models.config import ModelConfig
from m3d_lit.models.llm import unwrap
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


def _clip_components(preset: str, overrides: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parameter counts of the CLIP model's parts, and its text encoder's sizes."""
    with torch.device("meta"):
        model = build_clip(preset, overrides)
        model.set_trainable(STAGE_TRAINABLE[1])
    projections = [*model.image_proj.parameters(), *model.text_proj.parameters(), model.logit_scale]
    components = {
        "vision": _count(model.vision.parameters()),
        "text": _count(model.text.parameters()),
        "projections": _count(projections),
    }
    config = resolve(preset, overrides)
    return components, _sizes(config.text, "bert", model.text.get_input_embeddings())


def _lamed_components(
    preset: str, stage: int, overrides: dict[str, Any] | None, model_dir: str | Path | None
) -> tuple[dict[str, Any], dict[str, Any], ModelConfig]:
    """Parameter counts of LaMed's parts, its LLM's sizes and its config."""
    with torch.device("meta"):  # LoRA adapters too: set_trainable creates them
        model = build_lamed(preset, overrides, llm_path=model_dir)
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
    llm_sizes = _sizes(model.config.llm, model.config.llm.family, unwrap(model.llm).get_input_embeddings())
    return components, llm_sizes, model.config


def _sizes(section: Any, family: str, embeddings: nn.Module) -> dict[str, Any]:
    """The sizes that say what a transformer is; `vocab_size` the rows the model has (a preset without
    one takes its tokenizer's length)."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    return {"family": family, **{key: section[key] for key in keys}, "vocab_size": embeddings.num_embeddings}


def describe(
    preset: str,
    stage: int = 3,
    overrides: dict[str, Any] | None = None,
    model_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Parameter counts of `preset` with the trainability of `stage` (1: CLIP model, 2-3: LaMed).

    Args:
        preset: `tiny`, `small` or `paper`.
        stage: 1 (the CLIP model), 2 or 3 (LaMed); sets which parts count as trainable.
        overrides: nested values merged into the preset.
        model_dir: an official M3D-LaMed directory, described instead of the preset (stages 2 and 3).
    """
    if stage not in STAGE_TRAINABLE:
        raise InputError("stage", f"{stage} must be one of {sorted(STAGE_TRAINABLE)}")
    if model_dir is not None and stage == 1:
        raise InputError(
            "--stage", "1 is the CLIP model; an M3D-LaMed directory is a stage-2/3 model (--stage 2 or 3)"
        )
    if stage == 1:
        config = resolve(preset, overrides)
        components, sizes = _clip_components(preset, overrides)
        language = {"text": sizes}
    else:
        components, sizes, config = _lamed_components(preset, stage, overrides, model_dir)
        language = {"llm": sizes}
    patches, visual = _token_counts(config)
    return {
        "preset": config.preset if model_dir is None else "m3d",
        "model": None if model_dir is None else str(model_dir),
        "stage": stage,
        "components": components,
        "input": {
            "channels": config.vision.in_channels,
            "img_size": list(config.img_size),
            "patch_size": list(config.patch_size),
        },
        "max_length": config.clip.max_length if stage == 1 else config.max_length,
        **language,
        "patch_tokens": patches,
        "visual_tokens": visual,
        "total_params": sum(c["params"] for c in components.values()),
        "trainable_params": sum(c["trainable"] for c in components.values()),
    }
