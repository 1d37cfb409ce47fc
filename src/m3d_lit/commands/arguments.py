"""The argument parser of the `m3d-lit` tools: a mistake on the command line is one line and exit status 2.

argparse prints its usage screen and exits on its own; here its message becomes an `InputError` naming
the option, which `m3d-lit` prints as `m3d-lit <command>: error: <option>: <problem>` (`--help` still
prints the usage).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from m3d_lit.errors import InputError

__all__ = [
    "CommandParser",
    "HelpFormatter",
    "answering_checkpoint_option",
    "check_out_folder",
    "inference_options",
    "json_object",
    "model_options",
    "model_source_options",
    "official_directory",
    "shown_default",
]


def shown_default(value: Any) -> str:
    """A default as it would be typed on the command line: `32 256 256`, `none`, `cpu`."""
    if value is None or value == []:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default as typed, unless the text already says it; a flag
    (`--overwrite`) is off unless given, and a required option has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0 or "default" in text:
            return text
        return f"{text} (default: {shown_default(action.default).replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors raise `InputError` instead of printing usage and exiting,
    and whose `--help` shows every option's default (`HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--m3d` must not silently mean `--m3d-shape`
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        named = re.match(r"argument ([^:]+): (.*)", message, flags=re.DOTALL)
        if named:
            option = named.group(1).split("/")[-1]
            raise InputError(option, named.group(2))
        raise InputError("arguments", message)


def json_object(text: str) -> dict[str, Any]:
    """An argparse `type`: a JSON object (argparse reports the problem with the option's name)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg} at column {err.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"llm\": {{...}}}}', got {text!r}")
    return value


def official_directory(text: str) -> Path:
    """An argparse `type`: an official M3D-LaMed directory (its config.json names an M3D-LaMed model)."""
    from m3d_lit.models.official.lamed import FAMILIES, is_official_lamed  # torch: only when used

    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is not a folder (give an M3D-LaMed directory such as /models/M3D-LaMed-Phi-3-4B)"
        )
    if not is_official_lamed(path):
        raise argparse.ArgumentTypeError(
            f"{text} is not an M3D-LaMed directory: its config.json should name model_type "
            f"{' or '.join(sorted(FAMILIES))} (for a preset, use --preset)"
        )
    return path


@contextmanager
def model_options(option: str) -> Iterator[None]:
    """Building a model from a preset and the user's `--overrides`/`--trainable`: a `ValueError` there
    (a width not divisible by the heads, a pool that does not divide the grid...) is theirs to fix."""
    try:
        yield
    except InputError:
        raise
    except ValueError as err:
        raise InputError(option, f"the model cannot be built with these values: {err}") from None


def answering_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    """`--checkpoint`: a model that answers questions, in every form the one loader reads."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="stage-2/3 checkpoint, run or stage folder, export folder or M3D-LaMed directory",
    )


def model_source_options(parser: argparse.ArgumentParser, presets: list[str], doing: str) -> None:
    """`--preset` and `--model DIR`: the model a figure-only command (`describe`, `plan`) is about.

    Args:
        parser: the command's parser.
        presets: the preset names.
        doing: what the command does with the model ("describe", "plan"), for `--model`'s help.
    """
    parser.add_argument("--preset", default="paper", choices=presets, help="model size preset")
    parser.add_argument(
        "--model",
        type=official_directory,
        default=None,
        metavar="DIR",
        help=f"an official M3D-LaMed directory to {doing} instead of a preset (default: none, the preset)",
    )


def inference_options(parser: argparse.ArgumentParser) -> None:
    """`--device`, `--dtype` and `--max-new-tokens`, the same for every command that answers questions."""
    import torch  # only where a model runs: `m3d-lit --help` stays fast

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default: cuda when there is one, else cpu)")  # fmt: skip
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float64"),
        default="auto",
        help="weights and activations: auto = bfloat16 on CUDA, float32 on CPU; float64 makes greedy "
        "decoding independent of how a machine orders its sums (exact comparisons)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens")


def check_out_folder(out: Path, overwrite: bool, results: tuple[str, ...]) -> None:
    """Refuse an output folder that holds an earlier result (any of `results`) unless `overwrite`, and
    any folder that holds other files: `--overwrite` replaces a result folder whole, never a stranger's."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(out, "is a file; --out names a folder")
    found = sorted(p.name for p in out.iterdir())
    if not found:
        return
    if not any(name in results for name in found):
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise InputError(
            out, f"holds other files ({shown}), not an earlier result: choose an empty or new --out"
        )
    if not overwrite:
        raise InputError(
            out,
            f"holds an earlier result ({', '.join(n for n in found if n in results)}): pass --overwrite to "
            "replace it whole, or choose another --out",
        )
