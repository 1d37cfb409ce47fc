"""The bytes of the tensors autograd saves for backward, by the part of the model that saved them.

`m3d-lit plan` (`models/plan.py`) runs a reduced model's training forward inside `saved_bytes` and
scales each part's bytes to the preset's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from m3d_lit.models.llm import unwrap

__all__ = ["Scopes", "is_weight_copy", "saved_bytes"]

_VIEWS = ("TBackward", "ViewBackward", "PermuteBackward", "TransposeBackward", "ExpandBackward", "UnsqueezeBackward", "SqueezeBackward", "AliasBackward")  # fmt: skip


class Scopes:
    """Which part of the model is running (forward hooks), so saved bytes can be scaled per part."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = ["root"]
        self.block_inputs: dict[str, int] = {}
        self.handles = []
        layers = unwrap(model.llm).get_decoder().layers
        self._watch(model.vision.blocks[0], "vision_block", inputs=True)
        self._watch(model.vision, "vision_other")
        self._watch(model.perceiver, "perceiver")
        self._watch(layers[0], "llm_layer", inputs=True)
        self._watch(unwrap(model.llm).get_decoder(), "llm_other")  # LamedModel calls the decoder directly
        self._watch(model.seg_head, "llm_other")
        self._watch(model.segmentation.image_encoder.blocks[0], "seg_block", inputs=True)
        self._watch(model.segmentation, "seg_other")

    def _watch(self, module: nn.Module, name: str, inputs: bool = False) -> None:
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            self.stack.append(name)
            first = args[0] if args else kwargs.get("hidden_states")
            if inputs and isinstance(first, Tensor):
                self.block_inputs[name] = first.untyped_storage().nbytes()

        def post(_m: nn.Module, _a: tuple, _o: Any) -> None:
            self.stack.pop()

        self.handles += [
            module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post),
        ]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def is_weight_copy(t: Tensor) -> bool:
    """A bf16 autocast copy of a trainable parameter (or a view of one, e.g. the transpose a matmul saves)."""
    fn = t.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        if fn.name().startswith("ToCopyBackward"):
            return any(type(n).__name__ == "AccumulateGrad" for n, _ in fn.next_functions if n is not None)
        inputs = [n for n, _ in fn.next_functions if n is not None]
        if not fn.name().startswith(_VIEWS) or len(inputs) != 1:
            return False
        fn = inputs[0]
    return False


@contextmanager
def saved_bytes(model: nn.Module, img_size: tuple[int, ...]) -> Iterator[tuple[dict[str, int], Scopes]]:
    """Bytes of the distinct storages autograd saves, by scope; parameters and their casts excluded.

    A non-reentrant checkpoint's inputs count too: torch keeps them as saved tensors of a no-op node."""
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: set[int] = set()
    totals: dict[str, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr in owned or ptr in seen or is_weight_copy(t):
            return t
        seen.add(ptr)
        scope = scopes.stack[-1]
        if scope == "root":  # the losses: mask terms have the volume's voxels, the LM loss does not
            scope = "seg_other" if t.numel() % voxels == 0 else "llm_other"
        totals[scope] = totals.get(scope, 0) + t.untyped_storage().nbytes()
        return t

    voxels = math.prod(img_size)
    scopes = Scopes(model)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield totals, scopes
    finally:
        scopes.close()
