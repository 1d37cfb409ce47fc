"""`m3d-lit synth`: synthetic CQ500 (DICOM + reads.csv), PhysioNet CT-ICH (NIfTI + CSVs) and folder-source
datasets, and with `--m3d-data N` M3D-Data, for the demo, the tests and trying the pipeline.

Writers: `m3d_lit.data.synthetic` and `m3d_lit.data.synthetic_m3d`. `--folder N` writes `OUT/folder`:
`scans/` (NIfTI and DICOM), `masks/`, `labels.csv` and `findings.yaml`, ready for `m3d-lit prepare folder`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m3d_lit.commands.arguments import CommandParser
from m3d_lit.data.synthetic import build_dataset, write_cq500, write_folder, write_physionet
from m3d_lit.data.synthetic_m3d import write_m3d_data
from m3d_lit.errors import InputError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="m3d-lit synth", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, required=True, help="folder for cq500/, physionet/, folder/ and M3D-Data/"
    )
    ap.add_argument("--cq500", type=int, default=64, help="number of CQ500 scans (0 = none)")
    ap.add_argument("--physionet", type=int, default=64, help="number of PhysioNet patients (0 = none)")
    ap.add_argument(
        "--folder", type=int, default=0, metavar="N",
        help="also write an example of `prepare folder` of N scans into OUT/folder (0 = none)",
    )  # fmt: skip
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128), metavar=("D", "H", "W"),
                    help="volume size of the CQ500 and PhysioNet scans")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seed of the scans, findings and reports")
    ap.add_argument("--balanced", action="store_true", help="each finding in about half of the scans")
    ap.add_argument(
        "--m3d-data", type=int, default=0, metavar="N",
        help="also write M3D-Data (M3D-Cap, M3D-VQA, M3D-Seg) of N scans each into OUT/M3D-Data (0 = none)",
    )  # fmt: skip
    ap.add_argument("--m3d-shape", type=int, nargs=3, default=(32, 256, 256), metavar=("D", "H", "W"),
                    help="volume size of the M3D-Data images (the paper's 32 256 256 by default)")  # fmt: skip
    return ap


def main(argv: list[str]) -> int:
    """Entry point of `m3d-lit synth`."""
    args = _parser().parse_args(argv)
    shape = tuple(args.shape)
    if min(shape) < 8 or shape[1] != shape[2]:
        raise InputError("--shape", f"{shape}: need D, H, W >= 8 and H == W")
    if args.cq500 < 0 or args.physionet < 0:
        raise InputError("--cq500/--physionet", f"{args.cq500} and {args.physionet} must be >= 0")
    if args.folder < 0:
        raise InputError("--folder", f"{args.folder} must be >= 0")
    m3d_shape = tuple(args.m3d_shape)
    if args.m3d_data and (args.m3d_data < 3 or min(m3d_shape) < 8 or m3d_shape[1] != m3d_shape[2]):
        raise InputError(
            "--m3d-data/--m3d-shape", f"{args.m3d_data} and {m3d_shape}: need N >= 3, D, H, W >= 8, H == W"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for name, writer, count in (
        ("cq500", write_cq500, args.cq500),
        ("physionet", write_physionet, args.physionet),
        ("folder", write_folder, args.folder),
    ):
        if count:
            build_dataset(args.out / name, writer, count, shape, args.seed, args.balanced)
            print(f"m3d-lit synth: {count} {name} scans in {args.out / name}")
    if args.m3d_data:
        build_dataset(
            args.out / "M3D-Data", write_m3d_data, args.m3d_data, m3d_shape, args.seed, args.balanced
        )
        print(f"m3d-lit synth: M3D-Data of {args.m3d_data} scans each in {args.out / 'M3D-Data'}")
    return 0
