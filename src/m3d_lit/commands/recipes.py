"""`m3d-lit recipes`: the stage, trainer and data recipes that ship in the package, each with its purpose.

Each name works where `m3d-lit fit|validate|test` takes a file: `-c stage3` (or `-c stage3_finetune`),
`-c cpu`, `--data cq500_qa`.
"""

from __future__ import annotations

from m3d_lit.commands.arguments import CommandParser
from m3d_lit.errors import InputError
from m3d_lit.recipes import describe_recipe, find_recipe, list_recipes

__all__ = ["main"]

_HEADINGS = {
    "stage": "stages (-c NAME)",
    "trainer": "trainer presets (-c NAME, after the stage)",
    "data": "data (--data NAME)",
}


def main(argv: list[str] | None = None) -> int:
    """Print every recipe by kind as `name  what it is for`, or with NAME the path of that one recipe."""
    parser = CommandParser(prog="m3d-lit recipes", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="print only this recipe's path (e.g. stage3, cq500_qa)")
    parser.add_argument("--paths", action="store_true", help="list each recipe's path instead of its purpose")
    args = parser.parse_args(argv)
    if args.name:
        found = find_recipe(args.name, ("stage", "trainer", "data"))
        if found is None:
            raise InputError(args.name, "names no recipe (`m3d-lit recipes` lists them)")
        print(found)
        return 0
    blocks = []
    for kind, recipes in list_recipes().items():
        width = max(len(name) for name in recipes)
        shown = {name: str(path) if args.paths else describe_recipe(path) for name, path in recipes.items()}
        lines = [f"{_HEADINGS[kind]}:"] + [f"  {name:<{width}}  {text}" for name, text in shown.items()]
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0
