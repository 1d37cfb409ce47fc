"""The model's repeated blocks: which parts activation checkpointing recomputes, and compiling them.

`LamedModel.enable_gradient_checkpointing` and `LamedModel.compile_blocks` call these; the tasks'
`gradient_checkpointing` setting and `m3d-lit plan --checkpointing` are parsed by `checkpoint_parts`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from m3d_lit.models.llm import unwrap

__all__ = ["CHECKPOINT_PARTS", "checkpoint_parts", "compile_blocks", "set_checkpointing"]

# LLM decoder layers, vision encoder blocks, segmentation (SegVol) encoder blocks
CHECKPOINT_PARTS = ("llm", "vision", "seg")


def checkpoint_parts(mode: str) -> frozenset[str]:
    """The parts a checkpointing setting names: `none`, `all`, or parts of `CHECKPOINT_PARTS` joined by
    commas (`llm`, `vision,seg`); raises ValueError naming the valid ones."""
    if mode in ("none", "all"):
        return frozenset(CHECKPOINT_PARTS if mode == "all" else ())
    parts = [part.strip() for part in mode.split(",")]
    if any(part not in CHECKPOINT_PARTS for part in parts):
        raise ValueError(
            f"{mode!r} is not none, all, or a comma-separated list of {', '.join(CHECKPOINT_PARTS)}"
        )
    return frozenset(parts)


def set_checkpointing(model: nn.Module, llm: bool, vision: bool, seg: bool) -> None:
    """Non-reentrant activation checkpointing (reentrant breaks DDP with LoRA and frozen inputs) of the
    LLM's decoder layers (switched on only), the vision and the segmentation encoders' blocks."""
    if llm:
        base = unwrap(model.llm)
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.vision.gradient_checkpointing = vision
    model.segmentation.image_encoder.gradient_checkpointing = seg


def compile_blocks(model: nn.Module, **options: Any) -> None:
    """`torch.compile` the ViT's blocks, the LLM's decoder layers and the segmentation encoder's blocks,
    each on its own (in place, `nn.Module.compile`): one compiled graph serves every block of a part, and
    the glue between them stays eager."""
    blocks = [*model.vision.blocks, *unwrap(model.llm).get_decoder().layers]
    blocks += list(model.segmentation.image_encoder.blocks)
    for block in blocks:
        block.compile(**options)
