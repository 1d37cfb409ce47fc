"""Loading an `m3d-lit export` folder back (`commands/export.py` writes it) through the same door.

The folder's `m3d_lit.json` holds the model's bundle; the LLM comes from `llm/` (an export with
`--merge`: LoRA merged, the added rows written in) or from the bundle's `llm_path` with the peft adapter
of `adapter/`; the vision encoder, perceiver, segmentation module and added token rows from their
safetensors files.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from m3d_lit.errors import InputError
from m3d_lit.inference.build import build_model
from m3d_lit.inference.bundle import Bundle
from m3d_lit.inference.checkpoints import EXPORT_MANIFEST

__all__ = ["COMPONENT_FILES", "load_export"]

COMPONENT_FILES = ("vision", "perceiver", "segmentation", "new_tokens")


def _read(path: Path) -> dict[str, Any]:
    try:
        return load_file(str(path))
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot be read as safetensors ({err})") from None


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / EXPORT_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot be read as JSON ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("bundle"), dict):
        raise InputError(
            path, "holds no model record (exported by an older m3d-lit): export the checkpoint again"
        )
    return manifest


def _load_components(model: Any, folder: Path) -> None:
    missing = [name for name in COMPONENT_FILES if not (folder / f"{name}.safetensors").is_file()]
    if missing:
        raise InputError(
            folder, f"lacks {', '.join(f'{m}.safetensors' for m in missing)}: an incomplete export"
        )
    model.vision.load_state_dict(_read(folder / "vision.safetensors"))
    model.perceiver.load_state_dict(_read(folder / "perceiver.safetensors"))
    seg = _read(folder / "segmentation.safetensors")
    for part in ("segmentation", "seg_head"):
        getattr(model, part).load_state_dict(
            {k.removeprefix(f"{part}."): v for k, v in seg.items() if k.startswith(f"{part}.")}
        )
    model.new_tokens.load_state_dict(_read(folder / "new_tokens.safetensors"))


def load_export(folder: Path) -> tuple[Any, Bundle]:
    """(the model, its bundle) of an export folder (module docstring)."""
    manifest = _manifest(folder)
    bundle = Bundle.from_dict(manifest["bundle"], folder / EXPORT_MANIFEST)
    if manifest.get("merged"):
        # the merged LLM stands in for the base one: same tokenizer, LoRA inside its weights
        model = build_model(replace(bundle, llm_path=str(folder / "llm"), lora=None), folder)
    else:
        if bundle.llm_path is None:
            raise InputError(
                folder,
                "holds the LoRA adapter of a randomly initialised LLM, whose weights it lacks: export the "
                "checkpoint again with --merge",
            )
        model = build_model(replace(bundle, lora=None), folder)
        from peft import PeftModel  # peft is loaded only for adapters

        model.llm = PeftModel.from_pretrained(model.llm, str(folder / "adapter"), is_trainable=False)
    _load_components(model, folder)
    return model, bundle
