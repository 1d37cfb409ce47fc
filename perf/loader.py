"""Samples per second of the stage-3 DataModule: `.npy` cache (float16, float32, memory mapped) vs NIfTI.

.venv/bin/python perf/loader.py --samples 24 --workers 0 1 2 --size 32 256 256

Generated data at the paper size: cached volumes 1 x D x H x W in [0, 1] read by `BrainCTQADataModule`
(the training path: memory-mapped `.npy`, train-time augmentation, `LMCollator` with 256 image tokens
and 512-token rows); and raw int16 NIfTI scans (`--raw` D H W, like PhysioNet CT-ICH's 512 x 512 x ~34)
read, windowed and resized on the fly by `preprocess.load_and_preprocess` through the same collator.
Rates are timed over a second epoch (workers started, files in the page cache); the cached path is
also timed without augmentation, to show what augmentation costs. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_cache(root: Path, count: int, size: tuple[int, int, int], dtype: str) -> None:
    """`count` smooth random volumes and a `qa_train.jsonl` laid out like `m3d-lit prepare` output."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(count):
        coarse = rng.random((size[0], size[1] // 8, size[2] // 8), dtype=np.float32)
        volume = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[None].astype(dtype)
        np.save(root / "images" / f"s{i}.npy", volume)
        lines.append(
            {"id": f"s{i}", "image": f"images/s{i}.npy", "question": "Is there a bleed?",
             "answer": "Yes, an epidural hemorrhage on the left.", "kind": "open", "dataset": "bench",
             "patient": str(i)}
        )  # fmt: skip
    (root / "qa_train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def write_nifti(root: Path, count: int, raw: tuple[int, int, int]) -> list[Path]:
    """`count` int16 HU scans (H x W x D on disk, 0.45 x 0.45 x 5 mm) as uncompressed `.nii`."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    paths = []
    for i in range(count):
        hu = rng.integers(-1000, 1500, size=(raw[1], raw[2], raw[0]), dtype=np.int16)
        affine = np.diag([0.45, 0.45, 5.0, 1.0])
        path = root / f"{i:03d}.nii"
        nib.save(nib.Nifti1Image(hu, affine), str(path))
        paths.append(path)
    return paths


class NiftiOnTheFly(Dataset):
    """Decodes and preprocesses a NIfTI scan per item (what training would do without the cache).

    Args:
        paths: the scans.
        size: output (D, H, W).
    """

    def __init__(self, paths: list[Path], size: tuple[int, int, int]) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from m3d_lit.data.preprocess import load_and_preprocess

        prepared = load_and_preprocess(self.paths[index], self.size)
        return {
            "id": str(index), "image": torch.from_numpy(np.ascontiguousarray(prepared.image, dtype=np.float32)),
            "question": "Is there a bleed?", "answer": "No.", "kind": "open", "mask": None, "dataset": "bench",
        }  # fmt: skip


def _rate(loader: Any) -> float:
    """Samples/s of a second epoch: workers already started (persistent) and files in the page cache."""
    for _ in loader:
        pass
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["ids"])
    return seen / (time.perf_counter() - start)


def run(samples: int, otf_samples: int, workers: list[int], size: tuple, raw: tuple, batch: int) -> dict:
    """samples/s per (source, workers) and the cached / on-the-fly ratio."""
    from m3d_lit.data.collate import LMCollator
    from m3d_lit.data.datamodules import BrainCTQADataModule
    from m3d_lit.models.tokenizer import build_llm_tokenizer

    collate = LMCollator(build_llm_tokenizer(None), 256, 512, size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float16", "float32"):
            write_cache(Path(tmp) / dtype, samples, size, dtype)
            for w, augment in [(w, True) for w in workers] + [(workers[0], False)]:
                root = str(Path(tmp) / dtype)
                dm = BrainCTQADataModule([root], batch_size=batch, num_workers=w, augment=augment)
                dm.collate_fn = collate
                dm.setup("fit")
                source = f"npy-{dtype}" + ("" if augment else "-no-augment")
                rows.append({"source": source, "workers": w, "samples_per_s": _rate(dm.train_dataloader())})
        paths = write_nifti(Path(tmp) / "nifti", otf_samples, raw)
        for w in workers:
            loader = DataLoader(
                NiftiOnTheFly(paths, size), batch, num_workers=w, collate_fn=collate, persistent_workers=w > 0
            )
            rows.append({"source": "nifti-on-the-fly", "workers": w, "samples_per_s": _rate(loader)})
    best = {r["source"]: r["samples_per_s"] for r in rows if r["workers"] == workers[0]}
    return {
        "rows": rows,
        "size": list(size),
        "raw": list(raw),
        "cached_over_on_the_fly": best["npy-float16"] / best["nifti-on-the-fly"],
        "workers_compared": workers[0],
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24, help="cached volumes per dtype")
    ap.add_argument("--otf-samples", type=int, default=8, help="NIfTI scans decoded on the fly")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, nargs=3, default=(32, 256, 256), help="model input D H W")
    ap.add_argument("--raw", type=int, nargs=3, default=(34, 512, 512), help="NIfTI scan D H W")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see perf/README.md)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.batch < 1 or min(args.samples, args.otf_samples) < args.batch:
        raise ValueError(
            f"--samples {args.samples} and --otf-samples {args.otf_samples} must be >= --batch {args.batch}"
        )
    result = run(args.samples, args.otf_samples, args.workers, tuple(args.size), tuple(args.raw), args.batch)
    for row in result["rows"]:
        per = row["samples_per_s"] / max(row["workers"], 1)
        print(
            f"{row['source']:>17} workers={row['workers']}: {row['samples_per_s']:7.2f} samples/s ({per:.2f} per worker)"
        )
    print(
        f"cached float16 / on-the-fly at workers={result['workers_compared']}: x{result['cached_over_on_the_fly']:.1f}"
    )
    print(json.dumps({"loader": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
