"""BERT-family text encoder for CLIP-style pretraining (stage 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import BertConfig, BertModel

from m3d_lit.errors import InputError

__all__ = ["build_bert"]


def build_bert(path: str | Path | None = None, config: dict[str, Any] | None = None) -> BertModel:
    """A BERT encoder without the pooler (CLIP uses the CLS hidden state, so the pooler would be unused).

    Args:
        path: local directory with a BERT checkpoint; never a hub name.
        config: `BertConfig` fields for a randomly initialised model (used when `path` is None).
    """
    if path is not None:
        path = Path(path)
        if not path.is_dir():
            raise InputError(path, "text encoder directory not found")
        try:
            return BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
        except (OSError, ValueError) as err:
            raise InputError(path, f"not a loadable BERT checkpoint ({err})") from err
    if not config or "vocab_size" not in config:
        raise ValueError("build_bert needs a path, or a config with vocab_size")
    return BertModel(BertConfig(**config), add_pooling_layer=False)
