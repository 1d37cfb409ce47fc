"""Raw scans -> cached volumes + manifest, for any source (`m3d-lit prepare SOURCE --root RAW --out OUT`).

Writes `OUT/images/<id>.npy` (1 x D x H x W in [0, 1]), `OUT/masks/<id>.npy` (a source with masks, such as
PhysioNet: uint8, one per scan, empty where nothing is outlined), `OUT/manifest.csv`, `OUT/skipped.csv`
and `OUT/prepare.json`; `m3d_lit.data.qa.write_qa` then writes the QA files. What a scan is and how it is
read is the source's (`m3d_lit.data.sources`). Every file is written under a temporary name and renamed,
and the manifest is rewritten after each scan, so a killed run resumes where it stopped: a scan is
done when its manifest row exists, its image still has the recorded sha256 and its source files still
have the recorded names, sizes and modification times (`source_stamp`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from m3d_lit.atomic import TMP_PATTERN, write_bytes
from m3d_lit.data.geometry import ScanGeometry
from m3d_lit.data.preprocess import DEFAULT_SIZE, WINDOWS, check_size, preprocess_with_box
from m3d_lit.data.sources import SOURCES, ScanRef, get_source, option_owners, relative, safe_id
from m3d_lit.errors import InputError

__all__ = ["DATASETS", "MANIFEST_COLUMNS", "PrepareResult", "prepare_volumes", "safe_id"]

DATASETS = tuple(SOURCES)
MANIFEST_COLUMNS = (
    "id", "source", "orig_shape", "orig_spacing", "out_shape", "sha256", "source_stamp", "geometry",
)  # fmt: skip
SKIPPED_COLUMNS = ("id", "path", "reason")


@dataclass(frozen=True)
class _Job:
    source: str  # the source's name: workers look it up, they do not pickle it
    ref: ScanRef
    root: Path
    out: Path
    size: tuple[int, int, int]
    window: str
    dtype: str


@dataclass
class PrepareResult:
    """What `prepare_volumes` did.

    Args:
        ids: ids in the manifest (prepared now or in an earlier run), sorted.
        skipped: (id, path, reason) of the scans that could not be prepared.
        reused: how many scans an earlier run had already prepared.
    """

    ids: list[str]
    skipped: list[tuple[str, str, str]]
    reused: int


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _fmt(values: Sequence[float]) -> str:
    return "x".join(f"{float(v):.4g}" if isinstance(v, float) else str(v) for v in values)


def _source_stamp(job: _Job) -> str:
    """A digest of the names, sizes and modification times of a scan's source files (and the series
    override): a scan replaced or re-exported since its volume was written no longer matches."""
    ref = job.ref
    files = [ref.image] if ref.image.is_file() else sorted(ref.image.rglob("*"))
    files += [ref.mask] if ref.mask is not None else []
    digest = hashlib.sha256(str(ref.series).encode())
    for path in files:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{relative(path, job.root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _prepare_one(job: _Job) -> tuple[dict | None, tuple[str, str, str] | None]:
    """Read, preprocess and write one scan; a bad scan comes back as a skipped row."""
    sid = job.ref.sid
    try:
        scan, mask, source = get_source(job.source).read_scan(job.ref)
        hu = scan.hu
        if hu.shape[0] < 2:
            raise InputError(source, f"a single 2D slice (shape {hu.shape}), expected a 3D volume")
        image, out_mask, box = preprocess_with_box(hu, mask, job.size, job.window, source)
        if float(image.max() - image.min()) < 1e-6:
            raise InputError(source, "constant volume (no contrast after windowing)")
    except InputError as e:
        return None, (sid, relative(Path(e.path), job.root), e.problem)
    data = _npy_bytes(image.astype(job.dtype))
    write_bytes(job.out / "images" / f"{sid}.npy", data)
    if out_mask is not None:
        write_bytes(job.out / "masks" / f"{sid}.npy", _npy_bytes(out_mask))
    row = {
        "id": sid,
        "source": relative(source, job.root),
        "orig_shape": _fmt(hu.shape),
        "orig_spacing": _fmt(scan.spacing),
        "out_shape": _fmt(image.shape),
        "sha256": hashlib.sha256(data).hexdigest(),
        "source_stamp": _source_stamp(job),
        "geometry": ScanGeometry.build(scan.stored_shape, scan.affine, box, job.size).to_json(),
    }
    return row, None


def _worker_init() -> None:
    import torch  # each worker runs one scan at a time; torch's own threads would only fight the others

    torch.set_num_threads(1)


def _check_settings(out: Path, settings: dict, masks: bool) -> None:
    path = out / "prepare.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(path, f"unreadable ({e}); delete it or use another --out") from None
        if old != settings:
            raise InputError(
                path, f"{out} was prepared with {old}, this run asks for {settings}; use another --out"
            )
    elif (out / "images").is_dir() and any((out / "images").iterdir()):
        raise InputError(out, "holds images/ but no prepare.json (not made by `m3d-lit prepare`)")


def _start(out: Path, settings: dict, masks: bool) -> bool:
    """Make the output folders and record the settings; True when this run wrote `prepare.json` first."""
    folders = (out, out / "images") + ((out / "masks",) if masks else ())
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(TMP_PATTERN):  # from a killed run
            leftover.unlink()
    path = out / "prepare.json"
    created = not path.exists()
    write_bytes(path, (json.dumps(settings, indent=1) + "\n").encode())
    return created


def _undo_start(out: Path) -> None:
    """A run that prepared nothing leaves no settings behind (and no empty folders): the folder can be
    prepared again, with other settings or another source, as if this run had not been."""
    (out / "prepare.json").unlink(missing_ok=True)
    for folder in (out / "images", out / "masks"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _read_manifest(out: Path) -> dict[str, dict]:
    path = out / "manifest.csv"
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["id"]: r for r in rows if r.get("id") and r.get("sha256")}


def _still_valid(row: dict, job: _Job) -> bool:
    # a row from before the geometry was recorded is redone: eval --save-masks needs it
    if row.get("source_stamp") != _source_stamp(job) or not row.get("geometry"):
        return False
    image = job.out / "images" / f"{job.ref.sid}.npy"
    if not image.is_file() or hashlib.sha256(image.read_bytes()).hexdigest() != row["sha256"]:
        return False
    if job.ref.mask is None:
        return True
    try:
        mask = np.load(job.out / "masks" / f"{job.ref.sid}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return mask.dtype == np.uint8 and row["out_shape"] == _fmt(mask.shape)


def _write_tables(out: Path, rows: dict[str, dict], skipped: list) -> None:
    for name, columns, records in (
        ("manifest.csv", MANIFEST_COLUMNS, [rows[k] for k in sorted(rows, key=_natural)]),
        (
            "skipped.csv",
            SKIPPED_COLUMNS,
            [dict(zip(SKIPPED_COLUMNS, s)) for s in sorted(skipped, key=lambda s: _natural(s[0]))],
        ),
    ):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        write_bytes(out / name, buf.getvalue().encode())


def _run(jobs: list[_Job], workers: int, progress: bool, on_result) -> None:
    bar = tqdm(total=len(jobs), unit="scan", desc="prepare", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers <= 1:
            for job in jobs:
                on_result(*_prepare_one(job))
                bar.update()
            return
        # spawn, not fork: the parent may already run torch/OpenMP threads, which do not survive fork.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            pending = {pool.submit(_prepare_one, job) for job in jobs}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        on_result(*future.result())
                        bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def prepare_volumes(
    dataset: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: Sequence[int] = DEFAULT_SIZE,
    window: str = "brain",
    dtype: str = "float16",
    workers: int = 1,
    strict: bool = False,
    series_list: str | os.PathLike | None = None,
    progress: bool = True,
    options: Mapping[str, Any] | None = None,
) -> PrepareResult:
    """Prepare every scan of a raw dataset folder into `out` (see the module docstring).

    Args:
        dataset: a source name (`m3d_lit.data.sources.SOURCES`): "cq500" (root holds the scan folders),
            "physionet" (root holds ct_scans/ and masks/) or "folder" (root holds the user's scans).
        root: the raw dataset folder.
        out: the output folder; one made for another dataset or other settings is refused.
        size: output (D, H, W), divisible by the patch size (4, 16, 16).
        window: HU window name (`preprocess.WINDOWS`).
        dtype: "float16" or "float32" for the cached images.
        workers: processes; 1 runs in this process.
        strict: stop with `InputError` at the first scan that cannot be read instead of listing it.
        series_list: CQ500 only: a file like `cq500_series_folders.txt` choosing each scan's series.
        progress: show the progress bar.
        options: the source's own options by name (the folder source's `labels`, `findings`, `masks`);
            one the source does not take is refused.
    """
    source = get_source(dataset)
    if dtype not in ("float16", "float32"):
        raise InputError("dtype", f"{dtype!r} is not float16 or float32")
    if window not in WINDOWS:
        raise InputError("window", f"unknown window {window!r}; choose one of {sorted(WINDOWS)}")
    if workers < 1:
        raise InputError("workers", f"{workers} must be >= 1")
    options = {**(options or {}), **({"series_list": series_list} if series_list is not None else {})}
    source.check_options(options, option_owners())
    root, out, size = Path(root), Path(out), check_size(size)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    settings = {"dataset": dataset, "size": list(size), "window": window, "dtype": dtype}
    _check_settings(out, settings, source.writes_masks(options))
    refs, skipped = source.list_scans(root, {k: v for k, v in options.items() if v is not None})
    created = _start(out, settings, source.writes_masks(options))
    common = {"root": root, "out": out, "size": size, "window": window, "dtype": dtype}
    jobs = [_Job(source.name, ref, **common) for ref in refs]
    if strict and skipped:
        raise InputError(root / skipped[0][1], skipped[0][2])
    old = _read_manifest(out)
    rows = {j.ref.sid: old[j.ref.sid] for j in jobs if j.ref.sid in old and _still_valid(old[j.ref.sid], j)}
    reused = len(rows)

    def on_result(row: dict | None, skip: tuple[str, str, str] | None) -> None:
        if row is not None:
            rows[row["id"]] = row
        else:
            skipped.append(skip)
        _write_tables(out, rows, skipped)
        if skip is not None and strict:
            raise InputError(root / skip[1], skip[2])

    _write_tables(out, rows, skipped)
    try:
        _run([j for j in jobs if j.ref.sid not in rows], workers, progress, on_result)
    finally:
        if created and not rows:
            _undo_start(out)
    return PrepareResult(sorted(rows, key=_natural), sorted(skipped, key=lambda s: _natural(s[0])), reused)
