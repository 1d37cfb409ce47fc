"""The one backbone registry: name -> builder, used by every stage.

`build("vit3d", img_size=(32, 256, 256), patch_size=(4, 16, 16))`. Builders take keyword arguments only
and never reach the network: pretrained parts load from local directories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from m3d_lit.models.llm import build_causal_lm
from m3d_lit.models.perceiver import SequencePoolPerceiver, SpatialPoolPerceiver
from m3d_lit.models.segmentation import SegmentationModule
from m3d_lit.models.text import build_bert
from m3d_lit.models.vision import ViT3D

__all__ = ["BACKBONES", "build", "build_perceiver", "register"]

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "vit3d": ViT3D,
    "bert": build_bert,
    "spatial_pool": SpatialPoolPerceiver,
    "sequence_pool": SequencePoolPerceiver,
    "causal_lm": build_causal_lm,
    "segvol": SegmentationModule,
}


def register(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add a builder under a new name (a name already taken raises, so nothing is replaced silently)."""
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    BACKBONES[name] = builder


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as `name` with keyword arguments."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


def build_perceiver(spec: dict[str, Any], grid: Sequence[int], in_dim: int, out_dim: int) -> nn.Module:
    """The perceiver a preset's `perceiver` entry names (`spatial_pool` by default, or `sequence_pool`)."""
    options = dict(spec)
    name = options.pop("name", "spatial_pool")
    if name == "spatial_pool":
        return build(name, grid=grid, in_dim=in_dim, out_dim=out_dim, **options)
    num_patches = grid[0] * grid[1] * grid[2]
    return build(name, num_patches=num_patches, in_dim=in_dim, out_dim=out_dim, **options)
