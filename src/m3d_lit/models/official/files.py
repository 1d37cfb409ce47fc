"""Reading an official Hugging Face model directory: `config.json` and the weights in any saved layout.

Accepted weight layouts, first match wins: `model.safetensors`, `model.safetensors.index.json` with its
shards, `pytorch_model.bin`, `pytorch_model.bin.index.json` with its shards. Pickled files are read with
`torch.load(weights_only=True)`, so a file cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from m3d_lit.errors import InputError

__all__ = ["WEIGHT_FILES", "load_weights", "read_config"]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot be read ({type(err).__name__}: {err})") from err
    except json.JSONDecodeError as err:
        raise InputError(path, f"is not JSON ({err.msg}, line {err.lineno})") from err


def read_config(directory: Path) -> dict:
    """The directory's `config.json` as a dict; `InputError` when it is missing or not a JSON object."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "is not a directory")
    path = directory / "config.json"
    if not path.is_file():
        raise InputError(directory, "has no config.json: not a Hugging Face model directory")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise InputError(path, f"holds a {type(config).__name__}, not a JSON object")
    return config


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several types for damaged files
        raise InputError(path, f"is not a readable weight file ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "does not hold a flat name -> tensor dictionary")
    return state


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(index_path, "has no weight_map")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / str(shard)
        if not shard_path.is_file():
            raise InputError(shard_path, f"is named in {index_path.name} but missing")
        state.update(_read_file(shard_path))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise InputError(index_path, f"maps {len(absent)} tensors its shards lack, e.g. {absent[0]!r}")
    return state


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weights, on the CPU in their saved dtype."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return _read_sharded(path) if name.endswith(".index.json") else _read_file(path)
    raise InputError(directory, f"has no weights: expected one of {', '.join(WEIGHT_FILES)}")
