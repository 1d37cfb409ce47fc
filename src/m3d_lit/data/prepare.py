"""`m3d-lit prepare cq500|physionet --root RAW --out OUT`: raw scans -> cached volumes + manifest.

Writes `OUT/images/<id>.npy` (1 x D x H x W in [0, 1]), `OUT/masks/<id>.npy` (PhysioNet: uint8, one per
patient, empty where no bleed), `OUT/manifest.csv`, `OUT/skipped.csv` and `OUT/prepare.json`, then the
QA files through `m3d_lit.data.qa.write_qa`. Every file is written under a temporary name and renamed,
and the manifest is rewritten after each scan, so a killed run resumes where it stopped: a scan is
done when its manifest row exists, its image still has the recorded sha256 and its source files still
have the recorded names, sizes and modification times (`source_stamp`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from m3d_lit.arguments import CommandParser
from m3d_lit.atomic import TMP_PATTERN, write_bytes
from m3d_lit.data.geometry import ScanGeometry
from m3d_lit.data.io import (
    choose_series,
    find_cq500_scans,
    load_series_list,
    read_dicom_scan,
    read_nifti_scan,
)
from m3d_lit.data.preprocess import DEFAULT_SIZE, WINDOWS, check_size, preprocess_with_box
from m3d_lit.errors import InputError

__all__ = ["DATASETS", "MANIFEST_COLUMNS", "PrepareResult", "main", "prepare_volumes", "safe_id"]

DATASETS = ("cq500", "physionet")
MANIFEST_COLUMNS = (
    "id", "source", "orig_shape", "orig_spacing", "out_shape", "sha256", "source_stamp", "geometry",
)  # fmt: skip
SKIPPED_COLUMNS = ("id", "path", "reason")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def safe_id(sid: str, where: str | os.PathLike = "id") -> str:
    """Return `sid` if it is safe as a file name inside OUT (no `..`, `/` or `\\`), else raise InputError."""
    if ".." in sid or not _SAFE_ID.match(sid):
        raise InputError(
            where, f"scan id {sid!r} is not allowed (letters, digits, '.', '_', '-'; no '..' or '/')"
        )
    return sid


@dataclass(frozen=True)
class _Job:
    sid: str
    image: Path  # CQ500: the scan folder; PhysioNet: the NIfTI file
    mask: Path | None
    series: str | None  # CQ500 series override, relative to the scan folder
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
    files = [job.image, job.mask] if job.mask is not None else sorted(job.image.rglob("*"))
    digest = hashlib.sha256(str(job.series).encode())
    for path in files:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{_relative(path, job.root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _prepare_one(job: _Job) -> tuple[dict | None, tuple[str, str, str] | None]:
    """Read, preprocess and write one scan; a bad scan comes back as a skipped row."""
    try:
        if job.mask is None:
            series = choose_series(job.image, {job.sid: job.series} if job.series else None)
            source = series
            scan, mask = read_dicom_scan(series), None
        else:
            source = job.image
            scan, mask = read_nifti_scan(job.image, job.mask)
        hu = scan.hu
        if hu.shape[0] < 2:
            raise InputError(source, f"a single 2D slice (shape {hu.shape}), expected a 3D volume")
        image, out_mask, box = preprocess_with_box(hu, mask, job.size, job.window, source)
        if float(image.max() - image.min()) < 1e-6:
            raise InputError(source, "constant volume (no contrast after windowing)")
    except InputError as e:
        return None, (job.sid, _relative(Path(e.path), job.root), e.problem)
    data = _npy_bytes(image.astype(job.dtype))
    write_bytes(job.out / "images" / f"{job.sid}.npy", data)
    if out_mask is not None:
        write_bytes(job.out / "masks" / f"{job.sid}.npy", _npy_bytes(out_mask))
    row = {
        "id": job.sid,
        "source": _relative(source, job.root),
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


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _list_jobs(dataset: str, root: Path, series_list: Path | None, **common) -> tuple[list[_Job], list]:
    jobs, skipped = [], []
    if dataset == "cq500":
        override = load_series_list(series_list) if series_list else {}
        scans = find_cq500_scans(root)
        if not scans:
            raise InputError(root, "no CQ500 scan folders (CQ500-CT-<n> or 'CQ500CT<n> CQ500CT<n>') in it")
        for sid, folder in scans.items():
            jobs.append(_Job(sid, folder, None, override.get(sid), root, **common))
        return jobs, skipped
    scans = root / "ct_scans"
    if not scans.is_dir():
        raise InputError(root, "no ct_scans/ folder (expected the PhysioNet CT-ICH layout)")
    for image in sorted(scans.iterdir()):
        stem = re.sub(r"\.nii(\.gz)?$", "", image.name, flags=re.IGNORECASE)
        if stem == image.name or image.name.startswith("."):
            continue
        sid = f"{int(stem):03d}" if stem.isdigit() else stem
        masks = [
            root / "masks" / image.name,
            root / "masks" / f"{stem}.nii",
            root / "masks" / f"{stem}.nii.gz",
        ]
        mask = next((m for m in masks if m.is_file()), None)
        try:
            safe_id(sid, image)
            if mask is None:
                raise InputError(masks[0], f"no mask for {image.name} in masks/")
        except InputError as e:
            skipped.append((sid, _relative(Path(e.path), root), e.problem))
            continue
        jobs.append(_Job(sid, image, mask, None, root, **common))
    if not jobs and not skipped:
        raise InputError(scans, "no .nii or .nii.gz files in it")
    return jobs, skipped


def _check_settings(out: Path, settings: dict) -> None:
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
    folders = (out, out / "images") + ((out / "masks",) if settings["dataset"] == "physionet" else ())
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(TMP_PATTERN):  # from a killed run
            leftover.unlink()
    write_bytes(path, (json.dumps(settings, indent=1) + "\n").encode())


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
    image = job.out / "images" / f"{job.sid}.npy"
    if not image.is_file() or hashlib.sha256(image.read_bytes()).hexdigest() != row["sha256"]:
        return False
    if job.mask is None:
        return True
    try:
        mask = np.load(job.out / "masks" / f"{job.sid}.npy", mmap_mode="r", allow_pickle=False)
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
) -> PrepareResult:
    """Prepare every scan of a raw dataset folder into `out` (see the module docstring).

    Args:
        dataset: "cq500" (root holds the scan folders) or "physionet" (root holds ct_scans/ and masks/).
        root: the raw dataset folder.
        out: the output folder; one made for another dataset or other settings is refused.
        size: output (D, H, W), divisible by the patch size (4, 16, 16).
        window: HU window name (`preprocess.WINDOWS`).
        dtype: "float16" or "float32" for the cached images.
        workers: processes; 1 runs in this process.
        strict: stop with `InputError` at the first scan that cannot be read instead of listing it.
        series_list: CQ500 only: a file like `cq500_series_folders.txt` choosing each scan's series.
        progress: show the progress bar.
    """
    if dataset not in DATASETS:
        raise InputError("dataset", f"{dataset!r} is not one of {DATASETS}")
    if dtype not in ("float16", "float32"):
        raise InputError("dtype", f"{dtype!r} is not float16 or float32")
    if window not in WINDOWS:
        raise InputError("window", f"unknown window {window!r}; choose one of {sorted(WINDOWS)}")
    if workers < 1:
        raise InputError("workers", f"{workers} must be >= 1")
    if series_list is not None and dataset != "cq500":
        raise InputError("series_list", "applies to cq500 only")
    root, out, size = Path(root), Path(out), check_size(size)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    _check_settings(out, {"dataset": dataset, "size": list(size), "window": window, "dtype": dtype})
    common = {"out": out, "size": size, "window": window, "dtype": dtype}
    jobs, skipped = _list_jobs(dataset, root, Path(series_list) if series_list else None, **common)
    if strict and skipped:
        raise InputError(root / skipped[0][1], skipped[0][2])
    old = _read_manifest(out)
    rows = {j.sid: old[j.sid] for j in jobs if j.sid in old and _still_valid(old[j.sid], j)}
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
    _run([j for j in jobs if j.sid not in rows], workers, progress, on_result)
    return PrepareResult(sorted(rows, key=_natural), sorted(skipped, key=lambda s: _natural(s[0])), reused)


def _parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="m3d-lit prepare", description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=DATASETS)
    ap.add_argument("--root", type=Path, required=True, help="raw dataset folder")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--size", type=int, nargs=3, default=DEFAULT_SIZE, metavar=("D", "H", "W"))
    ap.add_argument(
        "--window", choices=sorted(WINDOWS), default="brain", help="HU window (default brain L40/W80)"
    )
    ap.add_argument("--workers", type=int, default=1, help="processes")
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--strict", action="store_true", help="stop at the first scan that cannot be read")
    ap.add_argument("--seed", type=int, default=0, help="seed of the QA splits")
    ap.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=(0.7, 0.1, 0.2),
        metavar=("TRAIN", "VAL", "TEST"),
        help="patient shares of the splits made on the first run (later runs keep splits.json)",
    )
    ap.add_argument("--series-list", type=Path, help="cq500: file of '<scan>/<series path>' lines")
    ap.add_argument(
        "--seg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="physionet: also write each patient's segmentation question (stage 3 trains [SEG] on it; "
        "it is scored by Dice on its own, never with the text metrics)",
    )
    return ap


def main(argv: list[str]) -> int:
    """Entry point of `m3d-lit prepare`."""
    args = _parser().parse_args(argv)
    from m3d_lit.data.qa import check_fractions, write_qa

    check_fractions(args.fractions)  # before any scan is written
    result = prepare_volumes(
        args.dataset, args.root, args.out, args.size, args.window, args.dtype, args.workers,
        args.strict, args.series_list,
    )  # fmt: skip
    print(
        f"m3d-lit prepare: {len(result.ids)} scans in {args.out / 'images'} "
        f"({result.reused} from an earlier run), {len(result.skipped)} skipped (see {args.out / 'skipped.csv'})"
    )
    if not result.ids:
        raise InputError(args.root, "no scan could be prepared; see skipped.csv for the reasons")

    try:
        write_qa(args.dataset, args.root, args.out, result.ids, args.seed, args.fractions, seg=args.seg)
    except InputError as err:
        if err.path != "--fractions":
            raise
        total = len(result.ids) + len(result.skipped)
        counts = (
            f"{len(result.ids)} of {total} scans prepared ({len(result.skipped)} skipped, see skipped.csv)"
        )
        raise InputError(err.path, f"{counts}; {err.problem}") from None
    return 0
