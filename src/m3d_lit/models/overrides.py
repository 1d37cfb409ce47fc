"""Check a preset's `overrides` against the settings each part of the model really takes.

Every nested key must name a setting: a typo such as `{llm: {num_hiden_layers: 2}}` would otherwise be
stored by `LlamaConfig` as a new attribute that nothing reads, and the model would be built with the
preset's value without a word.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from m3d_lit.errors import InputError

__all__ = ["check_overrides", "section_settings"]

# arguments the model passes itself; an override of them would be ignored or clash
_PASSED_BY_MODEL = {"self", "img_size", "patch_size", "grid", "num_patches", "in_dim", "out_dim"}
# beyond the preset's own keys and the builders' arguments: read with a default by llm.py, and `rope_theta`,
# the transformers 4 name that LlamaConfig still maps into `rope_parameters`
_EXTRA = {
    "llm": {"layer_initializer_range", "attn_implementation", "rope_theta"},
    "lora": {"target_modules"},
    "clip": {"logit_scale"},
    "loss": {"dice_smooth"},
}
# top-level settings `LamedModel` reads with a default (the official M3D behaviours, docs/architecture.md)
_TOP_LEVEL = {"seg_head_dropout", "seg_prompt", "stop_token_ids"}


def _arguments(builder: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(builder).parameters) - _PASSED_BY_MODEL


def _hf_config_settings(section: str, merged: Mapping[str, Any]) -> set[str]:
    from transformers import BertConfig, PretrainedConfig

    own = BertConfig
    if section == "llm":  # `build_causal_lm` reads `family` and builds that family's config class
        from m3d_lit.models.llm import FAMILIES

        family = merged.get("family", "llama")
        if family not in FAMILIES:
            raise InputError("overrides", f"llm.family {family!r} is not one of {sorted(FAMILIES)}")
        own = FAMILIES[family][0]
    return _arguments(own.__init__) - _arguments(PretrainedConfig.__init__) | (
        {"family"} if section == "llm" else set()
    )


def section_settings(section: str, merged: Mapping[str, Any], preset: Mapping[str, Any]) -> set[str]:
    """Names a section of the resolved config accepts (`merged`: the section after the overrides)."""
    names = set(preset.get(section) or {}) | _EXTRA.get(section, set())
    if section == "vision":
        from m3d_lit.models.vision import ViT3D

        names |= _arguments(ViT3D.__init__)
    elif section == "segmentation":
        from m3d_lit.models.segmentation import SegmentationModule

        names |= _arguments(SegmentationModule.__init__)
    elif section == "perceiver":
        from m3d_lit.models.perceiver import SequencePoolPerceiver, SpatialPoolPerceiver

        kind = {"spatial_pool": SpatialPoolPerceiver, "sequence_pool": SequencePoolPerceiver}
        chosen = kind.get(merged.get("name", "spatial_pool"))
        if chosen is None:
            raise InputError(
                "overrides", f"perceiver.name {merged.get('name')!r} is not one of {sorted(kind)}"
            )
        names = {"name"} | _arguments(chosen.__init__)
    elif section in ("llm", "text"):
        names |= _hf_config_settings(section, merged)
    return names


def _unknown(section: str, given: Mapping[str, Any], valid: set[str]) -> str | None:
    unknown = sorted(set(given) - valid)
    if not unknown:
        return None
    hints = [m[0] for k in unknown if (m := difflib.get_close_matches(k, valid, n=1))]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    listed = ", ".join(f"{section}.{k}" for k in unknown)
    return f"{listed} is not a setting{hint}; {section} takes: {', '.join(sorted(valid))}"


def check_overrides(preset: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Raise `InputError` for an override key no part of the model reads, naming the valid ones."""
    if not isinstance(overrides, Mapping):
        example = "{llm: {num_hidden_layers: 2}}"
        raise InputError("overrides", f"must be a mapping such as {example}, got {overrides!r}")
    known = (set(preset) | _TOP_LEVEL) - {"preset"}
    unknown = sorted(set(overrides) - known - {"preset"})
    if unknown:
        raise InputError("overrides", f"unknown keys {unknown}; known: {sorted(known)}")
    for section, value in overrides.items():
        if section not in preset:
            continue
        base = preset[section]
        if isinstance(base, Mapping) != isinstance(value, Mapping):
            want = "a mapping of settings" if isinstance(base, Mapping) else f"a value like {base!r}"
            raise InputError("overrides", f"{section} takes {want}, got {value!r}")
        if isinstance(value, Mapping):
            merged = {**base, **value}
            problem = _unknown(section, value, section_settings(section, merged, preset))
            if problem:
                raise InputError("overrides", problem)
