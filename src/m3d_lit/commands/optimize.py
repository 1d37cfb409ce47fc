"""`m3d-lit optimize`: prepared data -> LitData chunks that the ``streaming`` data recipe trains from.

`m3d-lit optimize data/cq500 data/physionet --out chunks` writes ``chunks/cq500`` and ``chunks/physionet``
(every split, QA and report rows); `--recipe m3d_vqa` (a data recipe's name or YAML) writes what that
DataModule reads (M3D-Cap, M3D-VQA, M3D-Seg), as ``chunks/m3d_vqa``. Each scan is stored once per split
with all its rows, its volume in the cache's own dtype (`--dtype float16` converts), the masks only of
segmentation rows. A source is written into a temporary folder beside its target and renamed when whole;
a target that exists is refused. Copy the folders to an object store (e.g. `aws s3 sync`) to stream them
from there. The format: `m3d_lit.data.stream_format`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from m3d_lit.atomic import write_text
from m3d_lit.commands.arguments import CommandParser
from m3d_lit.data.datamodules import BaseDataModule, BrainCTQADataModule
from m3d_lit.data.datasets import Record
from m3d_lit.data.stream_format import FORMAT, MANIFEST, SPLITS, group_records, require_litdata, write_split
from m3d_lit.errors import InputError
from m3d_lit.recipes import find_recipe

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="m3d-lit optimize", description=__doc__.splitlines()[0])
    ap.add_argument("prepared", nargs="*", type=Path, help="`m3d-lit prepare` output folders")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME_OR_YAML",
                    help="a data recipe whose DataModule to write (m3d_cap, m3d_vqa, m3d_seg or a YAML); "
                    "repeatable (default: no recipe, the prepared folders only)")  # fmt: skip
    ap.add_argument("--out", type=Path, required=True, help="folder that gets one subfolder per source")
    ap.add_argument("--dtype", choices=("keep", "float16"), default="keep",
                    help="volume dtype in the chunks: the cache's own (keep) or float16")  # fmt: skip
    ap.add_argument("--chunk-mb", type=int, default=64, help="bytes per chunk file, in MiB")
    ap.add_argument("--workers", type=int, default=1, help="processes reading the volumes")
    return ap


def _prepared_source(folder: Path) -> tuple[dict[str, list[Record]], dict[str, Any] | None]:
    has_qa = any((folder / f"qa_{s}.jsonl").is_file() for s in SPLITS)
    has_reports = (folder / "reports.jsonl").is_file()
    if not (has_qa or has_reports):
        raise InputError(folder, "is not a `m3d-lit prepare` output (no qa_*.jsonl, no reports.jsonl)")
    modules = [BrainCTQADataModule([str(folder)], mode="qa")] if has_qa else []
    modules += [BrainCTQADataModule([str(folder)], mode="report")] if has_reports else []
    return _records(modules), modules[0].preprocessing


def _recipe_source(value: str) -> tuple[str, dict[str, list[Record]]]:
    path = Path(value) if Path(value).exists() else find_recipe(value, ("data",))
    if path is None:
        raise InputError("--recipe", f"{value!r} is neither a file nor a data recipe (`m3d-lit recipes`)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        module_name, _, class_name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        datamodule = cls(**(spec.get("init_args") or {}))
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, ImportError, ValueError) as err:
        raise InputError(path, f"cannot build its DataModule ({type(err).__name__}: {err})") from None
    if not isinstance(datamodule, BaseDataModule) or type(datamodule).read_split is BaseDataModule.read_split:
        raise InputError(path, f"{spec['class_path']} has no split files to write; give each source's recipe")
    return path.stem, _records([datamodule])


def _records(modules: list[BaseDataModule]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for split in SPLITS:
        rows = [r for m in modules for r in (m.read_split(split) or [])]
        if rows:
            out[split] = rows
    return out


def _sources(args: argparse.Namespace) -> dict[str, tuple[dict[str, list[Record]], dict[str, Any] | None]]:
    sources: dict[str, tuple[dict[str, list[Record]], dict[str, Any] | None]] = {}
    named = [(folder.resolve().name, folder) for folder in args.prepared] + [(r, None) for r in args.recipe]
    for name, folder in named:
        if folder is not None:
            records, preprocessing = _prepared_source(folder)
        else:
            name, records = _recipe_source(name)
            preprocessing = None
        if name in sources:
            raise InputError(
                "--out", f"two inputs are named {name!r}; optimize them into separate --out folders"
            )
        if not records:
            raise InputError(folder or name, "has no rows in any split")
        sources[name] = (records, preprocessing)
    return sources


def _check_out(out: Path, names: list[str]) -> None:
    if "://" in str(out):
        raise InputError("--out", f"{out}: write to a local folder, then copy it to the object store")
    for marker in (MANIFEST, "index.json"):
        if (out / marker).exists():
            raise InputError(
                "--out", f"{out} is itself a chunk folder ({marker}); choose an empty or new folder"
            )
    taken = [out / n for n in names if (out / n).exists()]
    if taken:
        raise InputError(
            "--out",
            f"{taken[0]} already exists (chunks of an earlier run?): remove it or choose another --out",
        )


def _write_source(
    name: str, records: dict[str, list[Record]], preprocessing: Any, args: argparse.Namespace
) -> str:
    target = args.out / name
    partial = args.out / f".{name}.partial-{os.getpid()}"
    dtype = None if args.dtype == "keep" else args.dtype
    splits = {}
    try:
        for split, rows in records.items():
            plans = group_records(rows)
            splits[split] = write_split(plans, partial / split, dtype, args.chunk_mb << 20, args.workers)
        shapes = {json.dumps([s["shape"], s["dtype"]]) for s in splits.values()}
        if len(shapes) > 1:
            raise InputError(name, f"volumes differ between splits: {sorted(shapes)}")
        manifest = {"format": FORMAT, "name": name, "preprocessing": preprocessing, "splits": splits}
        write_text(partial / MANIFEST, json.dumps(manifest))
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return _summary(name, splits)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def _summary(name: str, splits: dict[str, dict[str, Any]]) -> str:
    parts = []
    for split, entry in splits.items():
        rows = {m: len(t["item"]) for m, t in entry["rows"].items() if t["item"]}
        shown = ", ".join(f"{n} {m}" for m, n in rows.items())
        parts.append(
            f"{split}: {entry['items']} scans ({shown}), {_size(entry['bytes'] / entry['items'])}/scan"
        )
    first = next(iter(splits.values()))
    return f"{name}: {first['dtype']} {'x'.join(map(str, first['shape']))}; " + "; ".join(parts)


def main(argv: list[str]) -> int:
    """Entry point of `m3d-lit optimize`."""
    args = _parser().parse_args(argv)
    require_litdata("optimize")
    if not args.prepared and not args.recipe:
        raise InputError("arguments", "name at least one prepared folder or --recipe")
    if args.chunk_mb < 1 or args.workers < 1:
        raise InputError("--chunk-mb/--workers", f"{args.chunk_mb} and {args.workers} must be >= 1")
    sources = _sources(args)
    _check_out(args.out, list(sources))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (records, preprocessing) in sources.items():
        print(f"m3d-lit optimize: {_write_source(name, records, preprocessing, args)} -> {args.out / name}")
    return 0
