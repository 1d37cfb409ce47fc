"""`m3d-lit prepare SOURCE --root RAW --out OUT`: raw scans -> cached volumes, QA files and splits.

SOURCE is a name of `m3d_lit.data.sources` (cq500, physionet, folder); the options a source takes of its
own (`--series-list`, `--labels` ...) come from it. The volumes go through
`m3d_lit.data.prepare.prepare_volumes`, the questions and splits through `m3d_lit.data.qa.write_qa`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m3d_lit.commands.arguments import CommandParser
from m3d_lit.data.prepare import DATASETS, prepare_volumes
from m3d_lit.data.preprocess import DEFAULT_SIZE, WINDOWS
from m3d_lit.data.qa import check_fractions, write_qa
from m3d_lit.data.sources import option_help
from m3d_lit.errors import InputError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="m3d-lit prepare", description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=DATASETS, help="the raw data's layout (folder: your own scans)")
    ap.add_argument("--root", type=Path, required=True, help="raw dataset folder")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--size", type=int, nargs=3, default=DEFAULT_SIZE, metavar=("D", "H", "W"),
                    help="volume size the scans are resampled to, slices x height x width")  # fmt: skip
    ap.add_argument(
        "--window", choices=sorted(WINDOWS), default="brain", help="HU window (default brain L40/W80)"
    )
    ap.add_argument("--workers", type=int, default=1, help="processes")
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                    help="precision of the cached volumes")  # fmt: skip
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
    for option, text in option_help().items():
        ap.add_argument(f"--{option.replace('_', '-')}", type=Path, help=text)
    ap.add_argument(
        "--seg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="physionet, folder with --masks: also write each scan's segmentation question (stage 3 trains "
        "[SEG] on it; it is scored by Dice on its own, never with the text metrics)",
    )
    return ap


def main(argv: list[str]) -> int:
    """Entry point of `m3d-lit prepare`."""
    args = _parser().parse_args(argv)
    check_fractions(args.fractions)  # before any scan is written
    options = {option: getattr(args, option) for option in option_help()}
    result = prepare_volumes(
        args.dataset, args.root, args.out, args.size, args.window, args.dtype, args.workers,
        args.strict, progress=True, options=options,
    )  # fmt: skip
    print(
        f"m3d-lit prepare: {len(result.ids)} scans in {args.out / 'images'} "
        f"({result.reused} from an earlier run), {len(result.skipped)} skipped (see {args.out / 'skipped.csv'})"
    )
    if not result.ids:
        raise InputError(args.root, "no scan could be prepared; see skipped.csv for the reasons")

    try:
        write_qa(
            args.dataset, args.root, args.out, result.ids, args.seed, args.fractions, seg=args.seg,
            options=options,
        )  # fmt: skip
    except InputError as err:
        if err.path != "--fractions":
            raise
        total = len(result.ids) + len(result.skipped)
        counts = (
            f"{len(result.ids)} of {total} scans prepared ({len(result.skipped)} skipped, see skipped.csv)"
        )
        raise InputError(err.path, f"{counts}; {err.problem}") from None
    return 0
