"""LitData chunks of prepared data (`m3d-lit optimize`) and the manifest that describes them.

One source folder (a local folder or an object-store URL such as ``s3://bucket/m3d/cq500``):
```
SOURCE/m3d_lit_stream.json      name, volume dtype and shape, preprocessing, and per split: the number of
                                items per chunk and the row table (below); read once per rank at start-up
SOURCE/<split>/index.json       LitData's index; chunk-*.bin: one item per distinct scan of the split
```
An item holds ``image`` (1 x D x H x W in the cache's own dtype, or float16 with ``dtype="float16"``),
``masks`` (uint8, M x 1 x D x H x W: the distinct masks its segmentation rows use, M = 0 for most scans)
and ``rows`` (JSON: every question about that scan, each ``{"id", "question": [...], "answer": [...],
"kind", "dataset", "mask": slot or -1}`` with every wording). A scan asked six questions is stored once.
The row table lists, per mode (``qa``; ``report`` for caption rows), the ``item`` and ``slot`` of each row
in the order of the split's records, so a row's position is its index in the file-based DataModule.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from m3d_lit.data.datasets import Record, read_prepared_array
from m3d_lit.errors import InputError

# litdata asks PyPI for a newer version whenever a dataset is opened unless this is set: no network at run time
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

__all__ = [
    "MANIFEST",
    "MODES",
    "SPLITS",
    "ItemPlan",
    "group_records",
    "load_item",
    "read_manifest",
    "require_litdata",
    "row_mode",
    "write_split",
]

MANIFEST = "m3d_lit_stream.json"
FORMAT = 1
MODES = ("qa", "report")
SPLITS = ("train", "val", "test")


def require_litdata(setting: str) -> None:
    """A clear line where LitData is not installed (it is the optional `stream` extra)."""
    if importlib.util.find_spec("litdata") is None:
        raise InputError(
            setting, "streaming data needs LitData: `pip install 'm3d-lit[stream]'` (or `make setup`)"
        )


def row_mode(kind: str) -> str:
    """Caption rows (image-report pairs, stages 1 and 2) are the ``report`` mode; every other kind ``qa``."""
    return "report" if kind == "caption" else "qa"


@dataclass
class ItemPlan:
    """One scan of a split and its rows: (mode, position in that mode's records, record)."""

    image: Path
    rows: list[tuple[str, int, Record]] = field(default_factory=list)


def group_records(records: Iterable[Record]) -> list[ItemPlan]:
    """The records of one split grouped by scan, scans in order of first appearance; a record's position
    counts within its mode (`row_mode` of its kind)."""
    plans: dict[Path, ItemPlan] = {}
    counts = dict.fromkeys(MODES, 0)
    for record in records:
        mode = row_mode(record.kind)
        plans.setdefault(record.image, ItemPlan(record.image)).rows.append((mode, counts[mode], record))
        counts[mode] += 1
    return list(plans.values())


def _npy(path: Path) -> np.ndarray:
    return np.ascontiguousarray(read_prepared_array(path))


def _answers(record: Record, mask: np.ndarray | None) -> tuple[tuple[str, ...], bool]:
    """The wordings of the answer and whether the row keeps its mask (an empty M3D-Seg mask: negative)."""
    if record.answer_file is not None:
        try:
            text = record.answer_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(record.answer_file, f"cannot read the text: {err}") from err
        if not text:
            raise InputError(record.answer_file, "the text is empty")
        return (text,), mask is not None
    if record.negative and mask is not None and not mask.any():
        return record.negative, False
    return record.answer, mask is not None


def load_item(plan: ItemPlan, dtype: str | None = None) -> dict[str, Any]:
    """The stored item of one scan: its volume (``dtype`` None keeps the file's), its rows' masks, its rows."""
    image = _npy(plan.image)
    if dtype is not None:
        image = image.astype(dtype)
    masks: dict[Path, int] = {}
    stacked: list[np.ndarray] = []
    rows = []
    for _, _, record in plan.rows:
        mask = None if record.mask is None else (_npy(record.mask) > 0).astype(np.uint8)
        if mask is not None and mask.shape != image.shape:
            raise InputError(record.mask, f"mask shape {mask.shape} differs from image {image.shape}")
        answers, keep = _answers(record, mask)
        slot = -1
        if keep and mask is not None:
            if record.mask not in masks:
                masks[record.mask] = len(stacked)
                stacked.append(mask)
            slot = masks[record.mask]
        rows.append(
            {"id": record.id, "question": list(record.question), "answer": list(answers),
             "kind": record.kind, "dataset": record.dataset, "mask": slot}
        )  # fmt: skip
    empty = np.zeros((0, *image.shape), dtype=np.uint8)
    return {"image": image, "masks": np.stack(stacked) if stacked else empty, "rows": json.dumps(rows)}


def _load(job: tuple[ItemPlan, str | None]) -> dict[str, Any]:
    return load_item(*job)


def _items(plans: list[ItemPlan], dtype: str | None, workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        yield from (load_item(plan, dtype) for plan in plans)
        return
    # forked readers, results in order: the chunk order is the split order whatever the worker count
    with get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_load, [(plan, dtype) for plan in plans], chunksize=4)


def write_split(
    plans: list[ItemPlan], out: Path, dtype: str | None, chunk_bytes: int, workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write the items of one split as LitData chunks into ``out``; returns its manifest entry."""
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes)
    tables = {mode: {} for mode in MODES}
    shape, stored_dtype, nbytes = None, None, 0
    for index, (plan, item) in enumerate(zip(plans, _items(plans, dtype, workers))):
        image = item["image"]
        if shape is None:
            shape, stored_dtype = list(image.shape), str(image.dtype)
        elif list(image.shape) != shape or str(image.dtype) != stored_dtype:
            raise InputError(
                plan.image,
                f"volume {image.shape} {image.dtype} differs from the split's {shape} {stored_dtype}",
            )
        for slot, (mode, position, _) in enumerate(plan.rows):
            tables[mode][position] = (index, slot)
        nbytes += image.nbytes + item["masks"].nbytes + len(item["rows"])
        writer.add_item(index, item)
        if progress is not None:
            progress(index + 1)
    writer.done()
    writer.merge()
    index_file = json.loads((out / "index.json").read_text(encoding="utf-8"))
    rows = {
        mode: {"item": [t[p][0] for p in range(len(t))], "slot": [t[p][1] for p in range(len(t))]}
        for mode, t in tables.items()
    }
    return {
        "items": len(plans),
        "chunks": [int(c["chunk_size"]) for c in index_file["chunks"]],
        "bytes": nbytes,
        "shape": shape,
        "dtype": stored_dtype,
        "rows": rows,
    }


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _check_credentials(url: str, storage_options: dict[str, Any], setting: str) -> None:
    """An ``s3://`` source without credentials is named before any request is made."""
    if not url.startswith("s3://") or "aws_access_key_id" in storage_options:
        return
    import boto3

    if boto3.Session().get_credentials() is None:
        raise InputError(
            setting,
            f"{url}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
            "~/.aws/credentials), and AWS_ENDPOINT_URL for an S3-compatible store",
        )


def _s3_get(remote: str, storage_options: dict[str, Any]) -> bytes:
    """One small object with short timeouts: LitData's S3 download retries an unreachable endpoint for
    minutes, and a wrong URL should be named at once."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
    bucket, _, key = remote.removeprefix("s3://").partition("/")
    client = boto3.Session().client("s3", config=config, **storage_options)
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _fetch(url: str, storage_options: dict[str, Any] | None, cache_dir: Path, setting: str) -> bytes:
    from litdata.streaming.downloader import get_downloader

    options = dict(storage_options or {})
    _check_credentials(url, options, setting)
    remote = f"{url.rstrip('/')}/{MANIFEST}"
    buffer = io.BytesIO()
    try:
        if url.startswith("s3://"):
            buffer.write(_s3_get(remote, options))
        else:
            get_downloader(url, str(cache_dir), [], options).download_fileobj(remote, buffer)
    except Exception as err:  # boto, obstore and the other stores each raise their own types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(
            setting,
            f"{url}: cannot read {MANIFEST} ({type(err).__name__}: {first}); check the URL, the credentials and "
            "that the store is reachable, or copy the folder and give its local path",
        ) from None
    return buffer.getvalue()


def read_manifest(
    source: str, storage_options: dict[str, Any] | None, cache_dir: Path, setting: str = "data.input_dirs"
) -> dict[str, Any]:
    """The manifest of a streaming source folder (a local path or a URL), checked to be one."""
    if _is_url(source):
        data = _fetch(source, storage_options, cache_dir, setting)
    else:
        path = Path(source) / MANIFEST
        if not path.is_file():
            hint = "run `m3d-lit optimize PREPARED_DIR --out DIR` and give DIR/<name>"
            if (Path(source) / "prepare.json").is_file() or (Path(source) / "qa_train.jsonl").is_file():
                hint = (
                    f"it is a `prepare` folder: write its chunks with `m3d-lit optimize {source} --out DIR`"
                )
            raise InputError(setting, f"{source} is not a streaming folder (no {MANIFEST}): {hint}")
        data = path.read_bytes()
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(
            setting, f"{source}: {MANIFEST} is unreadable ({err}); write the folder again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(setting, f"{source}: {MANIFEST} is not format {FORMAT}; write the folder again")
    return manifest
