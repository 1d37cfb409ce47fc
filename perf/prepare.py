"""Scans per second of `m3d-lit prepare` on generated data.

.venv/bin/python perf/prepare.py --scans 32 --shape 32 128 128 --size 32 256 256 --workers 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from m3d_lit.commands import synth
from m3d_lit.data.prepare import prepare_volumes


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=32, help="scans per dataset")
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128), help="generated D H W")
    ap.add_argument("--size", type=int, nargs=3, default=(32, 256, 256), help="prepared D H W")
    ap.add_argument("--workers", type=int, nargs="+", default=(1, 2))
    ap.add_argument("--datasets", nargs="+", default=("cq500", "physionet"), choices=("cq500", "physionet"))
    return ap


def main() -> None:
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        counts = {d: (args.scans if d in args.datasets else 0) for d in ("cq500", "physionet")}
        start = time.perf_counter()
        synth.main(["--out", str(raw), "--cq500", str(counts["cq500"]), "--physionet",
                    str(counts["physionet"]), "--shape", *map(str, args.shape)])  # fmt: skip
        print(f"synth: {sum(counts.values())} scans in {time.perf_counter() - start:.1f} s")
        for dataset in args.datasets:
            for workers in args.workers:
                out = Path(tmp) / f"{dataset}-{workers}"
                start = time.perf_counter()
                result = prepare_volumes(
                    dataset, raw / dataset, out, args.size, workers=workers, progress=False
                )
                seconds = time.perf_counter() - start
                print(
                    f"prepare {dataset}: {len(result.ids)} scans {tuple(args.shape)} -> {tuple(args.size)}, "
                    f"workers={workers}: {seconds:.1f} s, {len(result.ids) / seconds:.2f} scans/s"
                )


if __name__ == "__main__":
    main()
