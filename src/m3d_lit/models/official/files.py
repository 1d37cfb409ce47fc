"""Reading a Hugging Face model directory: `config.json` and the weights in any saved layout.

Accepted weight layouts, first match wins: `model.safetensors`, `model.safetensors.index.json` with its
shards, `pytorch_model.bin`, `pytorch_model.bin.index.json` with its shards. Pickled files are read with
`torch.load(weights_only=True)`, so a file cannot run code.

`iter_weights` reads one tensor at a time straight into the dtype and device it is wanted in: a
safetensors file is read through a small reused buffer (its header gives each tensor's place), so
loading a 7B model in bf16 from fp32 files never holds more than the converted model and one buffer,
and no page of the file stays mapped. `weight_index` lists names, shapes and dtypes from the headers
alone, so a model can be checked against the files before anything is read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from m3d_lit.errors import InputError

__all__ = ["WEIGHT_FILES", "TensorInfo", "iter_weights", "load_weights", "read_config", "weight_index"]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# safetensors' dtype names (the format's specification)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
CHUNK_BYTES = 16 * 2**20  # the reused read buffer: small next to any layer, large enough to read fast


class TensorInfo(NamedTuple):
    """Where one saved tensor is and what it is."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    # safetensors: byte range inside the file; None for a pickled file
    span: tuple[int, int] | None


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


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of the first layout the directory has, in a fixed order."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        index = _read_json(path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(path, "has no weight_map")
        shards = [directory / str(shard) for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise InputError(shard, f"is named in {path.name} but missing")
        return shards
    raise InputError(directory, f"has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _safetensors_header(path: Path) -> dict[str, TensorInfo]:
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        start = 8 + size
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            entries[name] = TensorInfo(path, tuple(entry["shape"]), dtype, (start + begin, start + end))
        return entries
    except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"is not a readable safetensors file ({type(err).__name__}: {err})") from err


def _pickled(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for damaged files
        raise InputError(path, f"is not a readable weight file ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "does not hold a flat name -> tensor dictionary")
    return state


def weight_index(directory: Path) -> dict[str, TensorInfo]:
    """Name -> `TensorInfo` of every saved tensor, from the files' headers (pickled files are mapped)."""
    index: dict[str, TensorInfo] = {}
    for path in _weight_files(Path(directory)):
        if path.name.endswith(".safetensors"):
            index.update(_safetensors_header(path))
        else:
            index.update(
                {k: TensorInfo(path, tuple(v.shape), v.dtype, None) for k, v in _pickled(path).items()}
            )
    return index


def _read_span(f: Any, info: TensorInfo, out: torch.Tensor, buffer: torch.Tensor) -> None:
    """Read one safetensors tensor into `out` (any dtype and device) through `buffer` (raw bytes)."""
    begin, end = info.span
    item = torch.empty((), dtype=info.dtype).element_size()
    flat = out.view(-1)
    if (end - begin) != flat.numel() * item:
        raise InputError(info.file, f"a tensor's byte range does not match its shape {info.shape}")
    f.seek(begin)
    step = max(1, buffer.numel() // item)
    for first in range(0, flat.numel(), step):
        count = min(step, flat.numel() - first)
        raw = buffer[: count * item]
        if f.readinto(memoryview(raw.numpy())) != count * item:
            raise InputError(info.file, "ends inside a tensor: the file is truncated")
        flat[first : first + count].copy_(raw.view(info.dtype))


def iter_weights(
    directory: Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    names: set[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each saved tensor (or those in `names`), one at a time.

    Args:
        directory: a model directory in one of `WEIGHT_FILES`' layouts.
        dtype: floating-point tensors are converted to it while read (None: the saved dtype).
        device: where each tensor is made (None: the CPU).
        names: read only these.
    """
    index = weight_index(directory)
    buffer = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
    by_file: dict[Path, list[str]] = {}
    for name, info in index.items():
        if names is None or name in names:
            by_file.setdefault(info.file, []).append(name)
    for path, file_names in by_file.items():
        if not path.name.endswith(".safetensors"):
            state = _pickled(path)
            for name in file_names:
                tensor = state.pop(name)
                wanted = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                yield name, tensor.to(device=device, dtype=wanted, copy=True)
            continue
        with path.open("rb", buffering=0) as f:
            for name in sorted(file_names, key=lambda n: index[n].span[0]):
                info = index[name]
                wanted = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
                out = torch.empty(info.shape, dtype=wanted, device=device)
                _read_span(f, info, out, buffer)
                yield name, out


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weights, on the CPU in their saved dtype."""
    return dict(iter_weights(Path(directory)))
