"""`m3d-lit describe --preset paper [--stage 1|2|3] [--model DIR] [--json]`: a model's parts, input and sizes.

Everything is built on the meta device, so the paper preset (a 7B LLM) costs no memory and no weight is
read. Prints the input the model takes, its language model and the parameters of each part (all and
trainable at that stage) as a table, or (`--json`) `models.describe.describe`'s dict:
`{"components": {name: {"params", "trainable"}}, "input", "max_length", "llm" | "text", "patch_tokens",
"visual_tokens", "total_params", "trainable_params", "preset", "model", "stage"}`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from m3d_lit.commands.arguments import CommandParser, json_object, model_options, model_source_options
from m3d_lit.models.describe import describe
from m3d_lit.models.presets import PRESETS, STAGE_TRAINABLE

__all__ = ["format_describe", "format_params", "main"]

_WHAT = {
    1: "CLIP: 3D ViT + text encoder, contrastive",
    2: "M3D-LaMed: 3D ViT -> perceiver -> LLM -> segmentation; the perceiver and new token rows train",
    3: "M3D-LaMed: 3D ViT -> perceiver -> LLM with LoRA -> segmentation",
}


def format_params(count: int) -> str:
    """A parameter count as people read it: `6.738 B`, `87.4 M`, `32.8 K`, `512`."""
    for scale, unit, digits in ((1e9, "B", 3), (1e6, "M", 1), (1e3, "K", 1)):
        if count >= scale:
            return f"{count / scale:.{digits}f} {unit}"
    return str(count)


def _language(name: str, sizes: dict[str, Any]) -> str:
    return (
        f"  {name}: {sizes['family']}, {sizes['num_hidden_layers']} layers, width {sizes['hidden_size']}, "
        f"{sizes['num_attention_heads']} heads, MLP {sizes['intermediate_size']}, vocab {sizes['vocab_size']}"
    )


def format_describe(figures: dict[str, Any]) -> str:
    """A readable table of `describe`'s dict: what goes in, the language model, parameters per part."""
    shape = " x ".join(str(n) for n in [figures["input"]["channels"], *figures["input"]["img_size"]])
    patch = " x ".join(str(n) for n in figures["input"]["patch_size"])
    source = f"model {figures['model']}" if figures.get("model") else f"preset {figures['preset']}"
    stage = figures["stage"]
    context = "reports up to" if stage == 1 else "context"
    lines = [
        f"m3d-lit describe: {source}, stage {stage} ({_WHAT[stage]})",
        f"  input: {shape} (channels x D x H x W), patch {patch}: {figures['patch_tokens']} patch tokens"
        + ("" if stage == 1 else f" -> {figures['visual_tokens']} visual tokens")
        + f"; {context} {figures['max_length']} tokens",
        _language("text encoder" if stage == 1 else "llm", figures["text" if stage == 1 else "llm"]),
        f"  {'part':<14} {'parameters':>12} {'trainable':>12}",
    ]
    rows = [*figures["components"].items(), ("total", {"params": figures["total_params"],
                                                      "trainable": figures["trainable_params"]})]  # fmt: skip
    lines += [
        f"  {name:<14} {format_params(c['params']):>12} {format_params(c['trainable']):>12}"
        for name, c in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`m3d-lit describe`: print the table (or the JSON) of a preset or M3D-LaMed directory at a stage."""
    parser = CommandParser(prog="m3d-lit describe", description=__doc__.splitlines()[0])
    model_source_options(parser, sorted(PRESETS), "describe")
    parser.add_argument(
        "--stage", type=int, default=3, choices=sorted(STAGE_TRAINABLE), help="trainability of this stage"
    )
    parser.add_argument(
        "--overrides",
        type=json_object,
        default=None,
        help='JSON merged into the preset, e.g. \'{"llm": {"num_hidden_layers": 2}}\' '
        "(default: the preset as it is)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    args = parser.parse_args(argv)
    with model_options("--overrides"):
        figures = describe(args.preset, args.stage, args.overrides, args.model)
    print(json.dumps(figures, indent=2) if args.json else format_describe(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
