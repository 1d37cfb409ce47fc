"""Where a trained model lies on disk, and the one reader of Lightning checkpoints.

`read_checkpoint` is the only function that opens a Lightning checkpoint (`weights_only=True`): training
(`init_from`, resume checks), every inference command and `export` go through it, so a new checkpoint
layout (a sharded folder) is taught here once. `resolve_checkpoint` turns what a user may name into the
file or folder that holds a model:

- a checkpoint file (`last.ckpt`);
- a run folder (`runs/<stage>/<run>/`): its `last.ckpt` of the latest step under `checkpoints/`;
- a stage folder (`runs/<stage>/`): the run whose checkpoint was written last (the stage's latest run);
- an official M3D-LaMed or M3D-CLIP directory, or an `m3d-lit export` folder: themselves;
- a checkpoint folder of the `fsdp` preset (torch distributed-checkpoint shards and Lightning's `meta.pt`)
  or of the `zero2` preset (DeepSpeed's files and a plain `m3d_lit.ckpt`): themselves; `read_checkpoint`
  reads the first whole, in one process, and the second through its `m3d_lit.ckpt`.

Across runs, "latest" is the latest modification time, Lightning's own rule for `--ckpt_path last`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3d_lit.errors import InputError

__all__ = [
    "CHECKPOINTS",
    "CONSOLIDATED",
    "EXPORT_MANIFEST",
    "Resolved",
    "file_sha256",
    "is_checkpoint_folder",
    "is_sharded_checkpoint",
    "latest_run",
    "read_checkpoint",
    "resolve_checkpoint",
    "run_of",
    "zero_checkpoint_problem",
]

CHECKPOINTS = "checkpoints"  # the folder of a run that holds its checkpoint files
EXPORT_MANIFEST = "m3d_lit.json"  # what marks an `m3d-lit export` folder
_HASH_BLOCK = 1 << 20
CONSOLIDATED = "m3d_lit.ckpt"  # the plain checkpoint file inside a ZeRO checkpoint folder
LIGHTNING_META = "meta.pt"  # what Lightning writes beside the shards of a distributed checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder of the `fsdp` preset: torch distributed-checkpoint shards (`.metadata`) and `meta.pt`."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / LIGHTNING_META).is_file()


def is_checkpoint_folder(path: str | Path) -> bool:
    """A checkpoint written as a folder (the `fsdp` or the `zero2` preset's), read as one checkpoint."""
    return is_sharded_checkpoint(path) or (Path(path) / CONSOLIDATED).is_file()


def _read_sharded(path: Path) -> dict[str, Any]:
    """A sharded folder as the dict a Lightning checkpoint file holds (whole tensors on the CPU, without
    the optimizer state), read in one process without a process group."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        template = {
            key.removeprefix("state_dict."): torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            for key, entry in metadata.items()
            if key.startswith("state_dict.") and isinstance(entry, TensorStorageMetadata)
        }
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": as meant here
            warnings.simplefilter("ignore", UserWarning)
            load({"state_dict": template}, checkpoint_id=path, no_dist=True)
        record = torch.load(path / LIGHTNING_META, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for incomplete or foreign folders
        raise InputError(path, f"not a readable sharded checkpoint ({type(err).__name__}: {err})") from err
    return {**record, "state_dict": template}


def zero_checkpoint_problem(path: str | Path) -> str | None:
    """For a DeepSpeed ZeRO checkpoint folder (the `zero2` preset's `last.ckpt`): how to make it one file.

    The conversion reads DeepSpeed's pickles (`weights_only=False`), so it is left to a command the user
    runs on their own files rather than done silently on load.
    """
    path = Path(path)
    if not path.is_dir() or is_checkpoint_folder(path):
        return None
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else None
    if tag is None or not any((path / tag).glob("*model_states.pt")):
        return (
            "is a folder, not a checkpoint file (nor a run or stage folder with checkpoints/, a sharded "
            "checkpoint folder with .metadata and meta.pt, a DeepSpeed checkpoint folder with a `latest` tag, "
            "an m3d-lit export folder with m3d_lit.json, or an M3D-LaMed or M3D-CLIP directory with a "
            "config.json)"
        )
    out = path.with_name(f"{path.stem}.fp32.ckpt")
    command = (
        'python -c "from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict '
        f"as convert; convert('{path}', '{out}')\""
    )
    return (
        f"is a DeepSpeed ZeRO checkpoint folder (tag {tag!r}), not one file: convert it with `{command}` "
        f"(needs `pip install deepspeed`), then pass {out}"
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint safely (`weights_only=True`), with a clear error for a bad file; a
    checkpoint folder of the `fsdp` or `zero2` preset as the same dict."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _read_sharded(path)
    if path.is_dir() and (path / CONSOLIDATED).is_file():
        path = path / CONSOLIDATED
    problem = zero_checkpoint_problem(path)
    if problem:
        raise InputError(path, problem)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        cause = f"{type(err).__name__}: {err}"
        problem = f"not a readable checkpoint: truncated, damaged or not from torch.save ({cause})"
        raise InputError(path, problem) from err


def _newest(files: list[Path]) -> Path | None:
    return max(files, key=lambda p: (p.stat().st_mtime, str(p)), default=None)


def _step(path: Path) -> int:
    """A checkpoint's `global_step`, read without loading its tensors (-1 when unreadable)."""
    if is_sharded_checkpoint(path):
        path = path / LIGHTNING_META
    elif path.is_dir():
        path = path / CONSOLIDATED
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # a damaged file is named when it is loaded, not here
        return -1
    return int(step) if isinstance(step, int) else -1


def _run_checkpoint(run: Path) -> Path | None:
    """The checkpoint of a run that holds its latest step: among its `last.ckpt` files (`checkpoints/` and
    `checkpoints/steps/`) the one of the highest `global_step`, the top one on a tie (both are written
    when training ends); without any, its newest `.ckpt`; None when it has none."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return None
    last = sorted(folder.rglob("last.ckpt"))
    if last:
        return max(last, key=lambda p: (_step(p), p.parent == folder, p.stat().st_mtime))
    return _newest(list(folder.rglob("*.ckpt")))


def latest_run(stage: str | Path) -> Path | None:
    """The run of a stage folder (`runs/<stage>/`) whose checkpoint is the newest, or None."""
    stage = Path(stage)
    if not stage.is_dir():
        return None
    found = {run: _run_checkpoint(run) for run in stage.iterdir() if run.is_dir()}
    newest = _newest([ckpt for ckpt in found.values() if ckpt is not None])
    return None if newest is None else next(run for run, ckpt in found.items() if ckpt == newest)


def run_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint file lies in (`<run>/checkpoints/...`), or None."""
    for parent in Path(checkpoint).parents:
        if parent.name == CHECKPOINTS:
            return parent.parent
    return None


@dataclass(frozen=True)
class Resolved:
    """What a checkpoint argument named: the file or folder to load, and how it was found."""

    path: Path
    """The checkpoint file, or the official / export directory."""
    given: Path
    """What the user gave."""
    how: str | None = None
    """For a run or stage folder: which checkpoint it took, in words (None when `path` is `given`)."""


def resolve_checkpoint(given: str | Path) -> Resolved:
    """The file or folder a checkpoint argument names (module docstring); `InputError` when none."""
    given = Path(given)
    if not given.exists():
        raise InputError(given, "checkpoint not found (a .ckpt file, a run or stage folder under runs/, "
                                "an export folder or an M3D-LaMed directory)")  # fmt: skip
    if given.is_file() or (given / "config.json").is_file() or (given / EXPORT_MANIFEST).is_file():
        return Resolved(given, given)
    if is_checkpoint_folder(given):
        return Resolved(given, given)
    own = _run_checkpoint(given)
    if own is not None:
        return Resolved(own, given, f"run {given}: took {own}")
    run = latest_run(given)
    if run is not None:
        ckpt = _run_checkpoint(run)
        assert ckpt is not None  # latest_run only returns runs with a checkpoint
        return Resolved(ckpt, given, f"latest run of {given} is {run.name}: took {ckpt}")
    problem = zero_checkpoint_problem(given)
    if problem:
        raise InputError(given, problem)
    return Resolved(given, given)


def file_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of a folder's files (names and contents, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()
