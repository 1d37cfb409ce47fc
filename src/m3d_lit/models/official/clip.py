"""Load an official M3D-CLIP directory (`GoodBaiBai88/M3D-CLIP` layout) into m3d-lit's `ClipModel`.

The directory holds `config.json` (`model_type: m3d_clip`), the weights (`vision_encoder.*` a MONAI ViT
with a CLS token, `language_encoder.*` a BERT, `mm_vision_proj` / `mm_language_proj`, `logit_scale`) and
the BertTokenizer files. M3D-CLIP's config names its BERT by `language_model_name_or_path`, which the
official code fetches from the hub; here the BERT config is that folder's `config.json` when the
directory contains it, otherwise it is read off the weight shapes (BERT's 64-dimensional heads give the
head count, which shapes cannot). Every size is checked against the weights before anything is built.

The model is configured to compute what the official code computes: linear projections, L2
normalisation, and `logit_scale` multiplying the similarities directly (`clip.logit_scale: direct`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import BertTokenizer

from m3d_lit.errors import InputError
from m3d_lit.models.clip import ClipModel
from m3d_lit.models.config import ModelConfig
from m3d_lit.models.official.files import load_weights, read_config
from m3d_lit.models.presets import resolve

__all__ = ["M3D_CLIP_TYPE", "is_m3d_clip", "load_m3d_clip", "m3d_clip_config"]

M3D_CLIP_TYPE = "m3d_clip"
BERT_HEAD_DIM = 64
MAX_TEXT_TOKENS = 512  # what M3D's ITRDataset tokenizes to
# M3DCLIPConfig's defaults: a released config may leave any of these out.
_DEFAULTS = {
    "in_channels": 1,
    "img_size": [32, 256, 256],
    "patch_size": [4, 16, 16],
    "hidden_size": 768,
    "mlp_dim": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "pos_embed": "perceptron",
    "dropout_rate": 0.0,
    "spatial_dims": 3,
}
_RENAMES = (
    ("vision_encoder.", "vision."),
    ("language_encoder.", "text."),
    ("mm_vision_proj.", "image_proj."),
    ("mm_language_proj.", "text_proj."),
)
# BertModel's pooler (M3D-CLIP reads the CLS hidden state, never the pooler) and an old position-id buffer.
_UNUSED = ("language_encoder.pooler.", "language_encoder.embeddings.position_ids")
_V, _T = "vision_encoder.", "language_encoder."


def is_m3d_clip(path: str | Path) -> bool:
    """Whether `path` is a directory whose `config.json` declares an M3D-CLIP model."""
    path = Path(path)
    return (path / "config.json").is_file() and read_config(path).get("model_type") == M3D_CLIP_TYPE


class _Checker:
    """Compares the shapes the config implies with the weights, naming the first tensor that differs."""

    def __init__(self, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        self.directory, self.weights = directory, weights

    def expect(self, name: str, shape: tuple[int, ...], because: str) -> None:
        if name not in self.weights:
            raise InputError(self.directory, f"{because} needs {name!r}, which the weights lack")
        actual = tuple(self.weights[name].shape)
        if actual != shape:
            raise InputError(
                self.directory, f"{because} gives {name} the shape {shape}, but the weights hold {actual}"
            )

    def layers(self, prefix: str, marker: str, count: int, because: str) -> None:
        extra = f"{prefix}{count}.{marker}"
        if extra in self.weights:
            raise InputError(self.directory, f"{because}, but the weights also hold {extra!r}")


def _triple(value: Any, key: str, directory: Path) -> tuple[int, int, int]:
    values = [value] * 3 if isinstance(value, int) else value
    if (
        not isinstance(values, list)
        or len(values) != 3
        or not all(isinstance(v, int) and v > 0 for v in values)
    ):
        raise InputError(directory / "config.json", f"{key} {value!r} is not three positive integers")
    return tuple(values)  # type: ignore[return-value]


def _vision_sizes(config: dict, check: _Checker) -> dict[str, Any]:
    directory = check.directory
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
    if c["pos_embed"] != "perceptron" or c["spatial_dims"] != 3:
        raise InputError(
            directory / "config.json",
            f"pos_embed {c['pos_embed']!r}, spatial_dims {c['spatial_dims']}: "
            "only a 3D ViT with a perceptron patch embedding is supported",
        )
    img = _triple(c["img_size"], "img_size", directory)
    patch = _triple(c["patch_size"], "patch_size", directory)
    if any(i % p for i, p in zip(img, patch)):
        raise InputError(directory / "config.json", f"img_size {img} is not divisible by patch_size {patch}")
    names = ("hidden_size", "mlp_dim", "num_layers", "num_heads", "in_channels")
    h, mlp, layers, heads, channels = (int(c[k]) for k in names)
    if h % heads:
        raise InputError(directory / "config.json", f"hidden_size {h} is not divisible by num_heads {heads}")
    patches = math.prod(i // p for i, p in zip(img, patch))
    check.expect(f"{_V}patch_embedding.patch_embeddings.1.weight", (h, channels * math.prod(patch)),
                 f"hidden_size {h}, in_channels {channels}, patch_size {list(patch)}")  # fmt: skip
    check.expect(f"{_V}patch_embedding.position_embeddings", (1, patches, h),
                 f"img_size {list(img)} / patch_size {list(patch)} ({patches} patches)")  # fmt: skip
    check.expect(f"{_V}cls_token", (1, 1, h), f"hidden_size {h}")
    for i in range(layers):
        check.expect(f"{_V}blocks.{i}.attn.qkv.weight", (3 * h, h), f"hidden_size {h}, num_layers {layers}")
        check.expect(f"{_V}blocks.{i}.mlp.linear1.weight", (mlp, h), f"mlp_dim {mlp}, hidden_size {h}")
    check.layers(f"{_V}blocks.", "norm1.weight", layers, f"config.json says num_layers {layers}")
    return {"img_size": list(img), "patch_size": list(patch),
            "vision": {"hidden_size": h, "mlp_dim": mlp, "num_layers": layers, "num_heads": heads,
                       "in_channels": channels, "dropout_rate": float(c["dropout_rate"])}}  # fmt: skip


def _local_bert_config(directory: Path, config: dict) -> tuple[dict | None, Path | None]:
    """The BERT config of a folder inside `directory` named by `language_model_name_or_path`, if any."""
    name = config.get("language_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        return None, None
    folder = (directory / name).resolve()
    if not folder.is_relative_to(directory.resolve()) or not (folder / "config.json").is_file():
        return None, None
    return read_config(folder), folder / "config.json"


def _text_sizes(directory: Path, config: dict, check: _Checker) -> dict[str, Any]:
    words = check.weights.get(f"{_T}embeddings.word_embeddings.weight")
    if words is None or words.dim() != 2:
        raise InputError(directory, f"weights lack a 2-D {_T}embeddings.word_embeddings.weight")
    bert, source = _local_bert_config(directory, config)
    rows, width = (int(n) for n in words.shape)
    layers = 0
    while f"{_T}encoder.layer.{layers}.attention.self.query.weight" in check.weights:
        layers += 1
    inter = check.weights.get(f"{_T}encoder.layer.0.intermediate.dense.weight")
    positions = check.weights.get(f"{_T}embeddings.position_embeddings.weight")
    types = check.weights.get(f"{_T}embeddings.token_type_embeddings.weight")
    derived = {
        "vocab_size": rows, "hidden_size": width, "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // BERT_HEAD_DIM),
        "intermediate_size": 4 * width if inter is None else int(inter.shape[0]),
        "max_position_embeddings": MAX_TEXT_TOKENS if positions is None else int(positions.shape[0]),
        "type_vocab_size": 2 if types is None else int(types.shape[0]),
    }  # fmt: skip
    kind = (bert or {}).get("position_embedding_type", "absolute")
    if kind != "absolute":  # transformers 5's BERT has absolute positions only
        raise InputError(source, f"position_embedding_type {kind!r} is not supported ('absolute')")
    text = {**derived, **{k: v for k, v in (bert or {}).items() if k in _BERT_FIELDS}}
    because = f"the BERT config {source}" if source else "the BERT sizes read off the weights"
    _check_bert(text, check, because)
    return text


_BERT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "pad_token_id",
    "hidden_dropout_prob", "attention_probs_dropout_prob",
)  # fmt: skip


def _check_bert(text: dict, check: _Checker, because: str) -> None:
    h, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    if h % text["num_attention_heads"]:
        raise InputError(check.directory, f"{because}: hidden_size {h} is not divisible by its head count")
    check.expect(f"{_T}embeddings.word_embeddings.weight", (text["vocab_size"], h), because)
    check.expect(f"{_T}embeddings.position_embeddings.weight", (text["max_position_embeddings"], h), because)
    check.expect(f"{_T}embeddings.token_type_embeddings.weight", (text["type_vocab_size"], h), because)
    for i in range(layers):
        check.expect(f"{_T}encoder.layer.{i}.attention.self.query.weight", (h, h), because)
        check.expect(f"{_T}encoder.layer.{i}.intermediate.dense.weight", (inter, h), because)
    check.layers(
        f"{_T}encoder.layer.", "attention.self.query.weight", layers, f"{because} has {layers} layers"
    )


def m3d_clip_config(directory: Path, config: dict, weights: dict[str, torch.Tensor]) -> ModelConfig:
    """m3d-lit's resolved CLIP configuration for an M3D-CLIP directory, checked against its weights."""
    check = _Checker(directory, weights)
    sizes = _vision_sizes(config, check)
    text = _text_sizes(directory, config, check)
    width, text_width = sizes["vision"]["hidden_size"], text["hidden_size"]
    check.expect("mm_vision_proj.weight", (width, width), f"hidden_size {width}")
    check.expect(
        "mm_language_proj.weight", (width, text_width), f"hidden_size {width}, BERT width {text_width}"
    )
    check.expect("logit_scale", (), "M3D-CLIP's scalar logit scale")
    max_length = min(MAX_TEXT_TOKENS, text["max_position_embeddings"])
    clip = {"embed_dim": width, "max_length": max_length, "head": "linear", "logit_scale": "direct"}
    return resolve("paper", {**sizes, "text": text, "clip": clip})


def _tokenizer(directory: Path, rows: int) -> Any:
    # BertTokenizer by name: AutoTokenizer would follow the config's `auto_map` and ask to run remote code.
    if not (directory / "vocab.txt").is_file():
        raise InputError(directory, "has no vocab.txt (M3D-CLIP's BertTokenizer files)")
    try:
        tokenizer = BertTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(directory, f"BertTokenizer files do not load ({err})") from err
    if len(tokenizer) > rows:
        raise InputError(
            directory / "vocab.txt", f"has {len(tokenizer)} tokens but the BERT embeddings only {rows} rows"
        )
    return tokenizer


def _renamed(directory: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in weights.items():
        if name.startswith(_UNUSED):
            continue
        for old, new in _RENAMES:
            if name.startswith(old):
                state[new + name[len(old) :]] = tensor
                break
        else:
            if name != "logit_scale":
                raise InputError(directory, f"weights hold {name!r}, which M3D-CLIP does not have")
            state[name] = tensor
    return state


def load_m3d_clip(directory: str | Path) -> Any:
    """The M3D-CLIP of `directory` as an m3d-lit `ClipModel` (fp32, CPU, eval mode)."""
    directory = Path(directory)
    config = read_config(directory)
    if config.get("model_type") != M3D_CLIP_TYPE:
        raise InputError(
            directory / "config.json", f"model_type {config.get('model_type')!r} is not {M3D_CLIP_TYPE!r}"
        )
    weights = load_weights(directory)
    resolved = m3d_clip_config(directory, config, weights)
    tokenizer = _tokenizer(directory, resolved.text.vocab_size)
    model = ClipModel(resolved, tokenizer=tokenizer)
    state = _renamed(directory, weights)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        raise InputError(directory, f"weights lack {len(missing)} tensors of M3D-CLIP, e.g. {missing[0]!r}")
    if unexpected:
        raise InputError(directory, f"weights hold {len(unexpected)} tensors M3D-CLIP does not have, "
                         f"e.g. {unexpected[0]!r}")  # fmt: skip
    model.load_state_dict(state, strict=True)
    return model.eval()
