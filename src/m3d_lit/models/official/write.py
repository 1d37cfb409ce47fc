"""A `LamedModel` built from an official M3D-LaMed directory, written back in that layout.

`m3d-lit export --format m3d` uses it: LoRA merged into the LLM, the trained rows of the added tokens
written into the embedding and output matrices, every key renamed to the official one, SegVol's
unused prompt layers put back, and the source directory's config.json, generation config and tokenizer
files copied. What the official code loads (`from_pretrained`) and what `build_official_lamed` reads;
an unchanged model comes back with the same tensors, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from m3d_lit.errors import InputError
from m3d_lit.models.official.lamed import is_official_lamed

__all__ = ["lamed_to_official", "write_m3d"]

# LamedModel's prefixes -> the official ones (the inverse of `lamed.official_to_lamed`)
_PREFIXES = (
    ("vision.", "model.vision_tower.vision_tower."),
    ("perceiver.", "model.mm_projector."),
    ("segmentation.", "model.seg_module."),
    ("seg_head.", "model.seg_projector."),
    ("llm.lm_head.", "lm_head."),
    ("llm.model.", "model."),
)
_COPIED = (
    "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)  # fmt: skip
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lamed_to_official(key: str) -> str | None:
    """`LamedModel` state-dict key -> the official key; None for m3d-lit's own (the added rows)."""
    for new, old in _PREFIXES:
        if key.startswith(new):
            return old + key[len(new) :]
    return None


def _merged_state(model: Any) -> dict[str, torch.Tensor]:
    llm = model.llm.merge_and_unload() if hasattr(model.llm, "peft_config") else model.llm
    model.llm = llm
    head = llm.get_output_embeddings()
    model.new_tokens.write_back(llm.get_input_embeddings().weight, None if head is None else head.weight)
    state = {}
    for key, value in model.state_dict().items():
        official = lamed_to_official(key)
        if official is not None:
            state[official] = value
    state.update(getattr(model, "unused_official_weights", {}))
    return state


def write_m3d(model: Any, source: Path, folder: Path, dtype: str | None = None) -> None:
    """Write `model` (built from the official directory `source`) into the new folder `folder`.

    Args:
        model: the `LamedModel` (LoRA adapters, if any, are merged into it).
        source: the official directory the model was built from (config and tokenizer come from it).
        folder: where to write; must not exist.
        dtype: weight dtype (`float32`, `bfloat16`, `float16`); None keeps the source's `torch_dtype`.
    """
    source = Path(source)
    if not is_official_lamed(source):
        raise InputError(
            source, "is not an official M3D-LaMed directory: --format m3d needs a model built from one"
        )
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    name = dtype or config.get("torch_dtype") or "float32"
    if name not in DTYPE_NAMES:
        raise InputError(source / "config.json", f"torch_dtype {name!r} is not one of {sorted(DTYPE_NAMES)}")
    state = _merged_state(model)
    folder.mkdir(parents=True)
    # safetensors refuses views and shared storage: independent contiguous copies
    tensors = {k: v.detach().cpu().to(DTYPE_NAMES[name]).contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config["torch_dtype"] = name
    config["vocab_size"] = int(tensors["model.embed_tokens.weight"].shape[0])
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for file in _COPIED:
        if (source / file).is_file():
            shutil.copyfile(source / file, folder / file)
