"""The training recipes that ship in the package: stage YAMLs, trainer presets and data YAMLs.

`stages/` (`stage1_clip.yaml`, ..., `trainer/*.yaml`) and `datamodules/` live here, so a plain
`pip install` has them; the repository's top-level `stages/` and `datamodules/` are links to these
folders. `m3d-lit fit|validate|test` accepts a recipe by name where it takes a file (`-c stage3`,
`-c stage3_finetune`, `-c cpu`, `--data cq500_qa`): `expand_argv` turns the names into these paths before
LightningCLI parses; a file that exists is always taken as it is, and a bare name that is neither is
refused with the recipes it is close to.
"""

from __future__ import annotations

import difflib
import re
from importlib.resources import files
from pathlib import Path

from m3d_lit.errors import InputError

__all__ = [
    "KINDS",
    "common_trainer",
    "describe_recipe",
    "expand_argv",
    "find_recipe",
    "list_recipes",
    "recipes_root",
]

# kind -> folder under the recipes root
KINDS = {"stage": "stages", "trainer": "stages/trainer", "data": "datamodules"}
COMMON_TRAINER = "stages/trainer/common.yaml"
_CONFIG_FLAGS = ("-c", "--config")


def recipes_root() -> Path:
    """The folder the recipes were installed in (`m3d_lit/recipes`)."""
    return Path(str(files(__name__)))


def list_recipes() -> dict[str, dict[str, Path]]:
    """Every recipe by kind (`stage`, `trainer`, `data`), each as name -> path."""
    root = recipes_root()
    return {
        kind: {path.stem: path for path in sorted((root / folder).glob("*.yaml"))}
        for kind, folder in KINDS.items()
    }


def find_recipe(name: str, kinds: tuple[str, ...]) -> Path | None:
    """The recipe `name` names among `kinds` (`stage3`, `stage3_finetune`, `stage3_finetune.yaml`, `cpu`),
    or None when it names none."""
    stem = name.removesuffix(".yaml")
    if "/" in stem or "\\" in stem:
        return None
    recipes = list_recipes()
    for kind in kinds:
        found = recipes[kind].get(stem)
        if found is None and kind == "stage" and re.fullmatch(r"stage\d+", stem):
            found = next((p for s, p in recipes[kind].items() if s.startswith(f"{stem}_")), None)
        if found is not None:
            return found
    return None


def describe_recipe(path: Path) -> str:
    """What a recipe is for: the first sentence of its header's first line."""
    first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    text = first.lstrip("# ").strip() if first.startswith("#") else ""
    return re.split(r"\.(?:\s|$)", text, maxsplit=1)[0]


def _expand(value: str, kinds: tuple[str, ...], flag: str) -> str:
    # a folder of the same name (a run's `fsdp/` checkpoints, say) is no configuration: the recipe wins
    if Path(value).is_file():
        return value
    found = find_recipe(value, kinds)
    if found is not None:
        return str(found)
    if re.fullmatch(r"[a-z0-9_]+", value):  # not a path, a class name or a YAML/JSON value
        # a bare name that is neither a file here nor a recipe: a typo, not a path to report as missing
        names = [name for kind in kinds for name in list_recipes()[kind]]
        close = difflib.get_close_matches(value.removesuffix(".yaml"), names, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise InputError(
            flag, f"{value!r} is neither a file nor a recipe: {hint}(`m3d-lit recipes` lists the recipes)"
        )
    return value


def expand_argv(argv: list[str]) -> list[str]:
    """`argv` of a LightningCLI command with recipe names given to `-c/--config` and `--data` replaced
    by their paths (a name that is an existing file, or names no recipe, stays as it is)."""
    out: list[str] = []
    flags = {**dict.fromkeys(_CONFIG_FLAGS, ("stage", "trainer", "data")), "--data": ("data",)}
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, sep, value = arg.partition("=")
        if arg in flags and i + 1 < len(argv):
            out += [arg, _expand(argv[i + 1], flags[arg], arg)]
            i += 2
            continue
        if sep and flag in flags:
            out.append(f"{flag}={_expand(value, flags[flag], flag)}")
        else:
            out.append(arg)
        i += 1
    return out


def common_trainer() -> Path:
    """The shared trainer block every LightningCLI command reads first."""
    return recipes_root() / COMMON_TRAINER
