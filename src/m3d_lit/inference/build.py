"""Building the model a `Bundle` describes: the one builder every loader uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from m3d_lit.errors import InputError
from m3d_lit.inference.bundle import Bundle, TokenizerRecord
from m3d_lit.models.clip import ClipModel
from m3d_lit.models.config import LoraConfig, ModelConfig
from m3d_lit.models.lamed import LamedModel
from m3d_lit.models.llm import apply_lora
from m3d_lit.models.official.lamed import build_official_lamed, is_official_lamed

__all__ = ["build_model"]


def build_model(bundle: Bundle, where: str | Path) -> nn.Module:
    """The model a bundle describes, with the LLM (or BERT) from its directory and fresh other weights."""
    try:
        config = ModelConfig.from_dict(bundle.config)
    except InputError as err:
        raise InputError(
            where, f"its model configuration does not fit this m3d-lit ({err.problem})"
        ) from None
    if bundle.kind == "clip":
        model: Any = ClipModel(config, bundle.text_path)
        tokenizer = model.text_tokenizer
    else:
        llm_path = bundle.llm_path
        official = llm_path is not None and is_official_lamed(llm_path)
        model = build_official_lamed(llm_path) if official else LamedModel(config, llm_path)
        if bundle.lora is not None:
            model.llm = apply_lora(model.llm, LoraConfig.from_dict(bundle.lora))
        tokenizer = model.tokenizer
    own = TokenizerRecord.of(tokenizer, None)
    recorded = bundle.tokenizer.sha256  # empty for an older checkpoint, which recorded none
    if recorded and (own.size, own.sha256) != (bundle.tokenizer.size, recorded):
        origin = bundle.tokenizer.source or "m3d-lit's built-in corpus"
        raise InputError(
            where,
            f"was trained with another tokenizer ({bundle.tokenizer.size} tokens, {bundle.tokenizer.sha256}, "
            f"from {origin}) than the one built now ({own.size} tokens, {own.sha256})",
        )
    return model
