"""Apply a run's nested `overrides` onto a `ModelConfig`, refusing every key that names no setting.

A typo such as `{llm: {num_hiden_layers: 2}}` would otherwise be passed to `LlamaConfig`, stored as an
attribute nothing reads, and the model built with the preset's value without a word. The settings of a
section are its dataclass fields (`models/config.py`); the LLM and BERT sections also take the arguments
of their transformers config class (passed on in `extra`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from m3d_lit.errors import InputError
from m3d_lit.models.config import LLM_FAMILIES, ModelConfig
from m3d_lit.models.config_base import deep_merge

__all__ = ["apply_overrides", "check_overrides", "section_settings"]

# beyond the LLM config class's own arguments: `attn_implementation` (PretrainedConfig's, set by
# `build_causal_lm`) and `rope_theta`, the transformers 4 name that LlamaConfig maps into `rope_parameters`
_HF_EXTRA = {"llm": {"attn_implementation", "rope_theta"}, "text": set()}


def _arguments(builder: Any) -> set[str]:
    return set(inspect.signature(builder).parameters) - {"self", "kwargs"}


def _hf_config_settings(section: str, merged: Mapping[str, Any]) -> set[str]:
    from transformers import BertConfig, PretrainedConfig

    own = BertConfig
    if section == "llm":  # `build_causal_lm` reads `family` and builds that family's config class
        from m3d_lit.models.llm import FAMILIES

        family = merged.get("family", "llama")
        if family not in LLM_FAMILIES:
            raise InputError("overrides", f"llm.family {family!r} is not one of {sorted(LLM_FAMILIES)}")
        own = FAMILIES[family][0]
    return _arguments(own.__init__) - _arguments(PretrainedConfig.__init__) | _HF_EXTRA[section]


def section_settings(section: str, merged: Mapping[str, Any]) -> set[str]:
    """Names a section accepts (`merged`: the section's values after the overrides)."""
    kind = ModelConfig.section_types()[section]
    names = kind.names()
    if section in ("llm", "text"):
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


def check_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Raise `InputError` for an override key no part of the model reads, naming the valid ones.

    Args:
        base: the configuration the overrides apply to, in its dict form.
        overrides: the nested overrides.
    """
    if not isinstance(overrides, Mapping):
        example = "{llm: {num_hidden_layers: 2}}"
        raise InputError("overrides", f"must be a mapping such as {example}, got {overrides!r}")
    known = ModelConfig.names() - {"preset"}
    unknown = sorted(set(overrides) - known - {"preset"})
    if unknown:
        raise InputError("overrides", f"unknown keys {unknown}; known: {sorted(known)}")
    sections = ModelConfig.section_types()
    for name, value in overrides.items():
        if name not in sections:
            if isinstance(value, Mapping):
                raise InputError("overrides", f"{name} takes a value like {base.get(name)!r}, got {value!r}")
            continue
        current = base.get(name)
        if not isinstance(value, Mapping):
            if current is None and value is None:
                continue
            raise InputError("overrides", f"{name} takes a mapping of settings, got {value!r}")
        merged = {**(current or {}), **value}
        problem = _unknown(name, value, section_settings(name, merged))
        if problem:
            raise InputError("overrides", problem)


def apply_overrides(config: ModelConfig, overrides: Mapping[str, Any] | None) -> ModelConfig:
    """`config` with the nested `overrides` merged in (a new config; `config` is left as it is)."""
    base = config.to_dict()
    check_overrides(base, overrides or {})
    return ModelConfig.from_dict(deep_merge(base, dict(overrides or {})))
