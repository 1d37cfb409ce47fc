"""Samples per second of one rank's training loader: LitData chunks (`StreamingDataModule`) vs `.npy` files.

.venv/bin/python perf/stream_loader.py --samples 48 --workers 2 --size 32 256 256

Generated data at the paper size (float16 cache, 1 x 32 x 256 x 256, as `m3d-lit prepare` writes it),
one scan per QA row like M3D-VQA's closed questions, written once as `prepare` files and once as chunks
by `m3d-lit optimize`; both loaders run side by side in this process with the same settings: training
augmentation, `LMCollator` with 256 image tokens and 512-token rows, `--workers` worker processes, one
rank. Rates are timed over a second epoch (workers started, files in the page cache), alternating the
two loaders `--repeats` times, so load from other processes affects both alike. Bytes per sample: the
files a row reads (its volume) and the chunk bytes per row. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import _rate, write_cache  # noqa: E402  (perf/ is not a package)


def _bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern))


def run(samples: int, workers: int, size: tuple, batch: int, repeats: int) -> dict:
    """samples/s of both loaders (the best of `repeats` alternating timings) and bytes per sample."""
    from m3d_lit.cli import main
    from m3d_lit.data.collate import LMCollator
    from m3d_lit.data.datamodules import BrainCTQADataModule
    from m3d_lit.data.streaming import StreamingDataModule
    from m3d_lit.models.tokenizer import build_llm_tokenizer

    collate = LMCollator(build_llm_tokenizer(None), 256, 512, size)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, chunks = Path(tmp) / "bench", Path(tmp) / "chunks"
        write_cache(prepared, samples, size, "float16")
        assert main(["optimize", str(prepared), "--out", str(chunks)]) == 0
        settings = {"batch_size": batch, "num_workers": workers, "augment": True, "flip_axes": (0, 1)}
        modules = {
            "files": BrainCTQADataModule([str(prepared)], **settings),
            "stream": StreamingDataModule([str(chunks / "bench")], **settings),
        }
        loaders = {}
        for name, module in modules.items():
            module.setup("fit")
            module.set_collator(collate)
            loaders[name] = module.train_dataloader()
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(repeats):
            for name, loader in loaders.items():
                rates[name].append(_rate(loader))
        per_sample = {
            "files": _bytes(prepared / "images", "*.npy") / samples,
            "stream": _bytes(chunks, "*.bin") / samples,
        }
    return {
        "samples_per_s": {name: max(values) for name, values in rates.items()},
        "all_timings": rates,
        "bytes_per_sample": per_sample,
        "size": list(size),
        "workers": workers,
        "batch": batch,
        "samples": samples,
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48, help="scans (one QA row each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=3, default=(32, 256, 256), help="volume D H W")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="alternating timings of each loader")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see perf/README.md)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.batch < 1 or args.samples < 2 * args.batch:
        raise ValueError(f"--samples {args.samples} must be >= 2 x --batch {args.batch}")
    result = run(args.samples, args.workers, tuple(args.size), args.batch, args.repeats)
    shape = "x".join(str(s) for s in result["size"])
    for name in ("stream", "files"):
        print(
            f"{name:>6} loader, 1 rank, workers={args.workers}, 1x{shape} float16: "
            f"{result['samples_per_s'][name]:6.2f} samples/s, {result['bytes_per_sample'][name] / 2**20:.3f} MiB/sample"
        )
    print(json.dumps({"stream_loader": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
