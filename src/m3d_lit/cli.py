"""The `m3d-lit` command: LightningCLI for training, plain subcommands for everything else.

`m3d-lit fit|validate|test -c stages/<stage>.yaml [--data datamodules/<source>.yaml] [--key value ...]`
runs a training recipe; the recipes ship in the package, so `-c stage3` and `--data cq500_qa` name them
(`m3d-lit recipes` lists them), and every run starts from the shared `stages/trainer/common.yaml`.
`m3d-lit synth|prepare|describe|plan|score|eval|ask|predict|embed|app|recipes ...` dispatch to the
`main(argv)` of their module, imported only when used so `--help` stays fast.

`predict` is both: `m3d-lit predict --checkpoint CKPT --input requests.csv --out predictions.jsonl` is the
request-file tool (`commands/predict.py`), and with a recipe (`-c`/`--config`) it is LightningCLI's
`predict` over a DataModule, through the same `predict_step`. The rule: a recipe makes it LightningCLI's.
"""

from __future__ import annotations

import importlib
import os
import sys

from m3d_lit.commands import LIGHTNING_COMMANDS
from m3d_lit.errors import InputError, TrainingError
from m3d_lit.recipes import expand_argv

__all__ = ["SUBCOMMANDS", "entry", "main"]

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": (
        "m3d_lit.commands.synth",
        "write synthetic CQ500- and PhysioNet-format brain CT (and a folder-source example)",
    ),
    "prepare": (
        "m3d_lit.commands.prepare",
        "raw scans (cq500, physionet or your own folder) -> cached volumes, QA files and splits",
    ),
    "optimize": (
        "m3d_lit.commands.optimize",
        "prepared folders or M3D-Data recipes -> LitData chunks for the streaming data recipe",
    ),
    "describe": ("m3d_lit.commands.describe", "parameter counts of a preset, without loading weights"),
    "plan": ("m3d_lit.commands.plan", "memory and FLOP estimate of a preset on a GPU"),
    "score": (
        "m3d_lit.commands.score",
        "score a predictions.jsonl (BLEU, ROUGE, METEOR; closed AUROC, open findings, Dice; 95% CIs)",
    ),
    "eval": ("m3d_lit.commands.evaluate", "generate answers for a QA split and write a report"),
    "ask": ("m3d_lit.commands.ask", "ask one question about one scan"),
    "predict": (
        "m3d_lit.commands.predict",
        "answer a file of requests (scan,question) -> predictions.jsonl (with -c: LightningCLI's predict)",
    ),
    "embed": (
        "m3d_lit.commands.embed",
        "image and text embeddings + logits (stage-1 checkpoint or M3D-CLIP)",
    ),
    "app": ("m3d_lit.commands.app", "a local web page: look at a scan, ask about it, see the mask"),
    "export": (
        "m3d_lit.commands.export",
        "stage-3 checkpoint -> LoRA adapter + weights (--merge: a merged HF model)",
    ),
    "bench": (
        "m3d_lit.commands.bench",
        "the eight M3D-Bench tasks -> predictions, metrics.json, report.md",
    ),
    "recipes": ("m3d_lit.commands.recipes", "the stage, trainer and data recipes that ship in the package"),
}


def _usage() -> str:
    lines = ["usage: m3d-lit COMMAND [ARGS]   (m3d-lit --version)", "", "training (LightningCLI; add --help for options):"]
    lines += [
        f"  {name:<10} {name} a recipe: -c stage1|stage2|stage3 (or a YAML)"
        for name in LIGHTNING_COMMANDS[:3]
    ]
    lines += ["", "tools:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _lightning(argv: list[str]) -> bool:
    """Whether `m3d-lit <argv>` runs LightningCLI: fit/validate/test always, predict with a recipe."""
    if argv[0] != "predict":
        return argv[0] in LIGHTNING_COMMANDS
    return any(arg in ("-c", "--config") or arg.startswith(("-c=", "--config=")) for arg in argv[1:])


def _input_cause(err: BaseException | None) -> InputError | None:
    while err is not None and not isinstance(err, InputError):
        err = err.__cause__
    return err


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `m3d-lit` console script."""
    explicit = argv is not None
    argv = list(argv if explicit else sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not argv:
        print(f"m3d-lit: a command is needed\n\n{_usage()}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"m3d-lit {_version()}")
        return 0
    command = argv[0]
    try:
        if _lightning(argv):
            from m3d_lit.commands.lightning_cli import (  # not for --help: they load torch
                optimizer_flags_to_model,
                run_lightning,
            )

            expanded = optimizer_flags_to_model(expand_argv(argv))
            if not explicit and expanded != argv:
                sys.argv[1:] = expanded  # DDP relaunches each rank with sys.argv: it gets the paths too
            try:
                run_lightning(expanded if explicit else None)
            except ValueError as err:
                # jsonargparse wraps what a task's __init__ raises; a bad input file stays one line
                cause = _input_cause(err)
                if cause is None:
                    raise
                raise cause from None
            return 0
        if command not in SUBCOMMANDS:
            print(f"m3d-lit: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
            return 2
        module = importlib.import_module(SUBCOMMANDS[command][0])
        return int(module.main(argv[1:]) or 0)
    except InputError as err:
        # one line, even where a library's message inside the problem spans several
        print(f"m3d-lit {command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"m3d-lit {command}: stopped: {err}", file=sys.stderr)
        return 1


def entry() -> int:
    """The console script: `main`, and a reader that closed the pipe (`m3d-lit -h | head`) ends it quietly."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # what is still buffered would be written again at exit, to a pipe nobody reads
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("m3d-lit")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(entry())
