"""Pictures of volumes for people: middle axial slices with masks overlaid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["middle_slice", "middle_slice_grid"]


def middle_slice(volume: Tensor, depth_index: int | None = None) -> Tensor:
    """The axial slice H x W at the middle depth (or `depth_index`) of a 1 x D x H x W volume."""
    if volume.dim() != 4:
        raise ValueError(f"expected a 1 x D x H x W volume, got shape {tuple(volume.shape)}")
    index = volume.shape[1] // 2 if depth_index is None else depth_index
    return volume[0, index].detach().float().cpu()


def _best_slice(mask: Tensor | None) -> int | None:
    """The depth where a mask is largest, so a small lesion is not missed by the middle slice."""
    if mask is None or mask.sum() == 0:
        return None
    return int(mask[0].flatten(1).sum(1).argmax())


def middle_slice_grid(
    images: Tensor,
    masks: Tensor | Sequence[Tensor | None] | None = None,
    predictions: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """One RGB picture (3 x H x (W * B)) of B volumes: grey scan, true mask in green, predicted in red."""
    tiles = []
    for i in range(images.shape[0]):
        truth = None if masks is None or masks[i] is None else masks[i].float()
        pred = None if predictions is None or predictions[i] is None else predictions[i].float()
        depth = _best_slice(truth if truth is not None else pred)
        grey = middle_slice(images[i], depth).clamp(0, 1)
        rgb = grey.expand(3, *grey.shape).clone()
        if truth is not None:
            rgb[1] = torch.maximum(rgb[1], 0.8 * (middle_slice(truth, depth) > 0.5).float())
        if pred is not None:
            rgb[0] = torch.maximum(rgb[0], 0.8 * (middle_slice(pred, depth) > 0.5).float())
        tiles.append(rgb)
    return torch.cat(tiles, dim=2)
