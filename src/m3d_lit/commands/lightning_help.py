"""`m3d-lit fit -c stage3 --help`: the options a user of the recipes changes, with this run's values.

LightningCLI's own help lists the several hundred options of Lightning's `Trainer` and, in subclass mode,
none of the model's (they are behind `--model.help CLASS`). This help lists the options of the model and
data classes the recipes given name, each with the value the run would take (the recipes', else the
class's default) and its `Args:` text, then the few trainer options most runs change. `--help-all` is
LightningCLI's full help; `--model.help CLASS` and `--print_config` work as in any LightningCLI.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import sys
import textwrap
from argparse import ArgumentError
from collections.abc import Callable
from typing import Any, NoReturn

import jsonargparse
import yaml
from jsonargparse import Namespace

from m3d_lit.recipes import list_recipes

__all__ = ["HELP_ALL", "asks_for_help", "print_short_help", "recipe_args", "short_help"]

HELP_ALL = "--help-all"
_HELP = ("-h", "--help")
_RECIPE_FLAGS = ("-c", "--config", "--data")

# the trainer options most runs change (`--trainer.<key>`), and what each means in this project
_TRAINER = {
    "max_epochs": "passes over the training data",
    "max_steps": "optimizer steps at most; -1: max_epochs decides",
    "accumulate_grad_batches": (
        "micro-batches per optimizer step: the global batch is --data.batch_size x this x the GPUs"
    ),
    "devices": "GPUs (or CPU processes) per machine",
    "num_nodes": "machines, with -c multinode (README: Train on GPUs)",
    "precision": "32-true, bf16-mixed, bf16-true (the GPU presets), 64-true; null: 32-true",
    "val_check_interval": (
        "validate every N training batches, or at this share of an epoch; null: at each epoch's end"
    ),
    "limit_train_batches": "training batches per epoch: a share or a count; null: all",
}


def asks_for_help(argv: list[str]) -> str | None:
    """`--help-all` or `--help` when the arguments after the command ask for one (else None)."""
    rest = argv[1:]
    if HELP_ALL in rest:
        return HELP_ALL
    return "--help" if any(arg in _HELP for arg in rest) else None


def recipe_args(argv: list[str]) -> list[str]:
    """The command and the recipes of `argv` (`-c`/`--config`, `--data` with a file), without the options:
    what shows the recipes' values when an option given is wrong."""
    kept, i = argv[:1], 1
    while i < len(argv):
        flag, sep, value = argv[i].partition("=")
        if flag in _RECIPE_FLAGS and (sep or i + 1 < len(argv)):
            value = value if sep else argv[i + 1]
            if flag != "--data" or value.endswith((".yaml", ".yml", ".json")):
                kept += [flag, value]
            i += 1 if sep else 2
            continue
        i += 1
    return kept


def _shown(value: Any) -> str:
    """A value as it is typed after an option or written in a recipe: `null`, `true`, `[a, b]`."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict) and "class_path" in value:
        return _instance(value["class_path"], value.get("init_args") or {})
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def _instance(class_path: str, args: dict[str, Any]) -> str:
    """`AdamW(lr=2e-05, weight_decay=0.0)`: a class and the arguments that differ from its defaults."""
    module, _, name = class_path.rpartition(".")
    try:
        defaults = {
            key: p.default
            for key, p in inspect.signature(getattr(importlib.import_module(module), name)).parameters.items()
        }
    except (ImportError, AttributeError, TypeError, ValueError):
        defaults = {}
    shown = ", ".join(
        f"{key}={arg}" for key, arg in args.items() if key not in defaults or defaults[key] != arg
    )
    return f"{name}({shown})"


def _row(option: str, text: str, value: Any, width: int) -> list[str]:
    """One option: its name, then its text ending in the value this run takes, wrapped under it."""
    text = " ".join(text.split()).rstrip(".")
    body = textwrap.wrap(f"{text} (default: {_shown(value)})", width=width - 8)
    return [f"  {option}", *(f"        {line}" for line in body)]


def _class_rows(part: str, section: Namespace | None, width: int) -> list[str]:
    """The options of the class a recipe gives `--model`/`--data`, with the recipe's values."""
    class_path = section.get("class_path") if isinstance(section, Namespace) else None
    if not class_path:
        return [
            f"{part}: no recipe names one: -c stage1|stage2|stage3 (`m3d-lit recipes` lists them) shows "
            f"its --{part} options"
        ]
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, part, fail_untyped=False, sub_configs=True)
    values = section.get("init_args") or Namespace()
    title = next(
        (g.title for g in parser._action_groups if g.title not in ("positional arguments", "options")), ""
    )
    lines = textwrap.wrap(f"{part}: {class_path}" + (f": {title}" if title else ""), width=width)
    for action in parser._actions:
        key = action.dest.removeprefix(f"{part}.")
        if not action.option_strings[0].startswith(f"--{part}.") or key.endswith(".help"):
            continue
        lines += _row(action.option_strings[0], action.help or "", values.get(key, action.default), width)
    return lines


def _trainer_rows(config: Namespace, width: int) -> list[str]:
    trainer = config.get("trainer") or Namespace()
    presets = ", ".join(name for name in list_recipes()["trainer"] if name != "common")
    lines = ["trainer (every option: --help-all)", "  -c PRESET", f"        the hardware: {presets}"]
    for key, text in _TRAINER.items():
        lines += _row(f"--trainer.{key}", text, trainer.get(key), width)
    logger = trainer.get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    if isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace):
        version = logger.init_args.get("version")
        lines += _row(
            "--trainer.logger.init_args.version",
            f"the run's folder under {logger.init_args.get('save_dir')}/{logger.init_args.get('name')}/; "
            "null: the next version_N",
            version,
            width,
        )
    lines += _row("--ckpt_path", "resume: last (the stage's latest run), a run folder or a .ckpt file",
                  config.get("ckpt_path"), width)  # fmt: skip
    lines += _row(
        "--seed_everything", "seed of everything random in the run", config.get("seed_everything"), width
    )
    return lines


def short_help(command: str, config: Namespace | None, problem: str | None = None) -> str:
    """The help of `m3d-lit <command> -c RECIPE ... --help`.

    Args:
        command: `fit`, `validate`, `test` or `predict`.
        config: that command's parsed configuration (recipes and options given), or None where they do
            not parse.
        problem: why they do not parse, said under the usage line.
    """
    width = min(shutil.get_terminal_size((100, 24)).columns, 110)
    config = config if config is not None else Namespace()
    lines = [
        f"usage: m3d-lit {command} -c RECIPE [-c PRESET] [--data DATA] [--model.NAME VALUE] "
        "[--data.NAME VALUE] [--trainer.NAME VALUE]",
        "",
        "The options of the recipes given, each with the value this run would take (the recipes', else "
        "the class's default).",
    ]
    if problem:
        shown = "the recipes' values are shown" if config else "no values are shown"
        lines += [f"(the options given do not parse, {shown}: {problem})"]
    for part in ("model", "data"):
        lines += ["", *_class_rows(part, config.get(part), width)]
    lines += ["", *_trainer_rows(config, width), ""]
    lines += [
        f"every option, Lightning's Trainer included: m3d-lit {command} ... {HELP_ALL}",
        "a class's options with its own defaults: --model.help CLASS, --data.help CLASS",
        "the whole configuration this run would use: --print_config",
    ]
    return "\n".join(lines)


def print_short_help(parser: Any, argv: list[str], explain: Callable[[str], str]) -> NoReturn:
    """Print `short_help` for `argv` (a LightningCLI command, `--help` in it) and exit 0.

    The values are those of the recipes and options given; of the recipes alone where an option is wrong
    (`explain` turns jsonargparse's message into the line that says so); none where no recipe is named.

    Args:
        parser: LightningCLI's parser, with its subcommands.
        argv: the command and its arguments.
        explain: jsonargparse's message of a parse error -> one line.
    """
    argv = [arg for arg in argv if arg not in _HELP]
    config, problem = None, None
    recipes = recipe_args(argv)
    for given in (argv, recipes) if len(recipes) > 1 else ():
        try:
            config = parser.parse_args(given)[argv[0]]
            break
        except ArgumentError as err:
            problem = problem or explain(str(err))
    print(short_help(argv[0], config, problem))
    sys.exit(0)
