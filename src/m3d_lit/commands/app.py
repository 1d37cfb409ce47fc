"""`m3d-lit app`: a local web page to look at a scan, ask about it and see the mask.

    m3d-lit app --checkpoint runs/stage3 [--data PREPARED_DIR ...] [--port 7860] [--host 127.0.0.1]
                [--max-new-tokens 64] [--device cpu|cuda] [--dtype auto|float32|bfloat16|float64]
                [--source NAME]

`--checkpoint` is anything `eval` and `ask` take: a checkpoint file, a run or stage folder, an
`m3d-lit export` folder or an M3D-LaMed directory.

Serves on 127.0.0.1 only unless `--host` widens it. Nothing leaves the machine: Gradio's analytics and
version check are off and the page's assets come from the installed package. Uploads and mask files
live in one temporary folder that is removed when the app stops (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from m3d_lit.app.server import PORTS, check_address, serve
from m3d_lit.commands.arguments import CommandParser, answering_checkpoint_option, inference_options
from m3d_lit.errors import InputError

__all__ = ["main"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def port_number(text: str) -> int:
    """An argparse `type`: a TCP port a page can be served on."""
    try:
        port = int(text)
    except ValueError:
        port = None
    if port is None or not PORTS[0] <= port <= PORTS[1]:
        raise argparse.ArgumentTypeError(f"{text} is not a port: give a number from {PORTS[0]} to {PORTS[1]}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="m3d-lit app", description=__doc__.split("\n\n")[0])
    answering_checkpoint_option(parser)
    parser.add_argument(
        "--data",
        nargs="*",
        type=Path,
        default=[],
        help="`m3d-lit prepare` folders whose qa_test.jsonl scans the page offers (default: no folder; "
        "scans are uploaded on the page)",
    )
    parser.add_argument("--port", type=port_number, default=7860, help="port the page is served on")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: this machine only)"
    )
    parser.add_argument(
        "--source",
        help="the training source uploads are read like, when its windows differ (default: the window "
        "all the model's training sources share)",
    )
    inference_options(parser)
    return parser


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not args.checkpoint.exists():
        raise InputError(
            args.checkpoint, "does not exist (`make demo` writes the demo's; or pass --checkpoint)"
        )
    for folder in args.data:
        if not folder.is_dir():
            raise InputError(folder, "is not a folder (expected an `m3d-lit prepare` output folder)")
    check_address(args.host, args.port)  # before the model loads: a busy port is said at once
    if args.host not in LOCAL_HOSTS:
        print(f"m3d-lit app: warning: listening on {args.host}: anyone who can reach this machine can see "
              "the scans and use the model", file=sys.stderr)  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="m3d-lit-app-"))
    # read by Gradio when it is imported: no telemetry, and every upload lands in our folder
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
    # Ctrl-C and SIGTERM stop it and remove the folder, also where SIGINT came ignored (a background job)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    try:
        serve(args, workdir)
    except KeyboardInterrupt:
        print("m3d-lit app: stopped", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
