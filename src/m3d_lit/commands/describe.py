"""`m3d-lit describe --preset paper [--stage 1|2|3]`: parameter counts without loading weights.

Everything is built on the meta device, so the paper preset (a 7B LLM) costs no memory. Prints
`{"components": {name: {"params", "trainable"}}, "patch_tokens", "visual_tokens", "total_params",
"trainable_params", "preset", "stage"}`.
"""

from __future__ import annotations

import json
import sys

from m3d_lit.commands.arguments import CommandParser, json_object, model_options
from m3d_lit.models.describe import describe
from m3d_lit.models.presets import PRESETS, STAGE_TRAINABLE

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """`m3d-lit describe`: print the parameter-count JSON of a preset and stage."""
    parser = CommandParser(prog="m3d-lit describe", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="model size preset")
    parser.add_argument(
        "--stage", type=int, default=3, choices=sorted(STAGE_TRAINABLE), help="trainability of this stage"
    )
    parser.add_argument(
        "--overrides",
        type=json_object,
        default=None,
        help='JSON merged into the preset, e.g. \'{"llm": {"num_hidden_layers": 2}}\'',
    )
    args = parser.parse_args(argv)
    with model_options("--overrides"):
        figures = describe(args.preset, args.stage, args.overrides)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
