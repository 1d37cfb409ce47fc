"""`m3d-lit plan --preset paper --stage 3 --gpu-mem 24 --micro-batch 2`: GPU memory and FLOPs of a stage.

Prints the memory per GPU by part, the largest micro-batch that fits, what would make it fit when it
does not, and the FLOPs per sample, as a table or (`--json`) the whole estimate; `--model DIR` plans an
official M3D-LaMed directory instead of a preset (its config and weight shapes are read, no weight).
`models/plan.py` says how each figure is obtained, `models/plan_advice.py` which settings it tries.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from m3d_lit.commands.arguments import CommandParser, json_object, model_options, model_source_options
from m3d_lit.models.plan import CHECKPOINTING, PlanSettings, plan
from m3d_lit.models.plan_advice import fit_advice
from m3d_lit.models.presets import PRESETS

__all__ = ["format_advice", "format_plan", "main"]


def _flags(changes: dict[str, Any], gpus: int) -> str:
    """Plan's options for `fit_advice`'s changes, with what sets each in training."""
    shown = {
        "checkpointing": lambda v: f"--checkpointing {v} (training: --model.gradient_checkpointing {v})",
        "zero": lambda v: (
            f"--zero {v} over {gpus} GPUs (training: -c zero2_8x4090"
            + (", --trainer.strategy.init_args.stage 1)" if v == 1 else ")")
        ),
        "frozen_dtype": lambda v: (
            f"--frozen-dtype {v} (every GPU trainer preset holds the frozen LLM in bf16)"
        ),
        "full_embeddings": lambda v: "without --full-embeddings (only the new token rows train)",
    }
    return ", ".join(shown[name](value) for name, value in changes.items())


def format_advice(result: dict[str, Any]) -> str | None:
    """What `fit_advice` found, in one line (None when the plan fits)."""
    advice, s = result.get("advice"), result["settings"]
    if advice is None:
        return None
    room = f"{s['gpu_mem']:g} GiB"
    if advice["changes"]:
        return (
            f"  to fit micro-batch {advice['micro_batch']} in {room}: "
            f"{_flags(advice['changes'], s['gpus'])}: "
            f"{advice['total_gib']:.2f} GiB, largest micro-batch then {advice['max_micro_batch']}"
        )
    if "best_gib" not in advice:
        return (
            f"  no setting plan covers fits micro-batch {s['micro_batch']} in {room}; micro-batch "
            f"{advice['micro_batch']} fits as set (raise --trainer.accumulate_grad_batches to keep the "
            "global batch)"
        )
    best = advice["best_settings"]
    zero = f", zero {best['zero']} over {s['gpus']} GPUs" if best["zero"] else ""
    return (
        f"  nothing plan covers fits {room}: micro-batch 1 needs {advice['needs_gib']:.2f} GiB as set and "
        f"{advice['best_gib']:.2f} GiB at the least (checkpointing {best['checkpointing']}{zero}, frozen "
        f"{best['frozen_dtype']}), {advice['frozen_gib']:.2f} of them the frozen weights: use GPUs with at "
        f"least {math.ceil(advice['best_gib'])} GiB, or -c fsdp, which also shards the frozen weights over "
        "the GPUs (plan does not estimate FSDP)"
    )


def format_plan(result: dict[str, Any]) -> str:
    """A readable table of `plan`'s result."""
    s, f, p = result["settings"], result["flops"], result["params"]
    fwd = ", ".join(f"{n} {v:.2f}" for n, v in f["forward_tflop"].items())
    source = f"model {s['model']}" if s.get("model") else f"preset {s['preset']}"
    largest = f"largest micro-batch that fits: {result['max_micro_batch']}"
    if result["max_micro_batch"] == 0:
        one = result["total_gib"] - result["per_sample_gib"] * (s["micro_batch"] - 1)
        largest += f" (micro-batch 1 needs {one:.2f} GiB)"
    advice = format_advice(result)
    return "\n".join(
        [
            f"m3d-lit plan: {source}, stage {s['stage']}, micro-batch {s['micro_batch']}, frozen "
            f"{s['frozen_dtype']}, checkpointing {s['checkpointing']}, zero {s['zero']}",
            f"  parameters: {p['frozen'] / 1e9:.3f} B frozen, {p['trainable'] / 1e6:.1f} M trainable",
            *(f"  {name:<26} {gib:8.2f} GiB" for name, gib in result["memory_gib"].items()),
            f"  {'total':<26} {result['total_gib']:8.2f} GiB of {s['gpu_mem']:g}: "
            + ("fits" if result["fits"] else "does NOT fit"),
            f"  per extra sample {result['per_sample_gib']:.2f} GiB; {largest}",
            *([advice] if advice else []),
            f"  forward TFLOP/sample: {fwd}",
            f"  training TFLOP/sample: {f['train_model_tflop_per_sample']:.2f} model, "
            f"{f['train_hardware_tflop_per_sample']:.2f} with recompute",
        ]
    )


def _parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="m3d-lit plan", description=__doc__.splitlines()[0])
    model_source_options(ap, sorted(PRESETS), "plan")
    ap.add_argument("--stage", type=int, default=3, choices=(2, 3), help="the stage's trainable parts")
    ap.add_argument("--gpu-mem", type=float, default=24.0, help="GiB per GPU")
    ap.add_argument("--micro-batch", type=int, default=2, help="samples per GPU per step")
    ap.add_argument(
        "--frozen-dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the frozen weights"
    )
    ap.add_argument("--full-embeddings", action="store_true", help="train whole embedding/output matrices")
    ap.add_argument(
        "--checkpointing",
        default="llm",
        help=f"activations recomputed in backward: {' | '.join(CHECKPOINTING)}, or parts joined by commas "
        "(e.g. vision,seg)",
    )
    ap.add_argument(
        "--lora-dropout", type=float, default=None, help="LoRA dropout (default: the model's, 0.1)"
    )
    ap.add_argument(
        "--zero", type=int, choices=(0, 1, 2), default=0, help="optimizer state sharding (ZeRO stage)"
    )
    ap.add_argument("--gpus", type=int, default=8, help="GPUs sharing the optimizer state with --zero")
    ap.add_argument(
        "--seg-share",
        type=float,
        default=None,
        help="share of rows that segment (default: 1 in stage 3, 0 in stage 2)",
    )
    ap.add_argument("--reserve", type=float, default=1.0, help="GiB for CUDA context and allocator slack")
    ap.add_argument(
        "--width-divisor",
        type=int,
        default=None,
        help="LLM width reduction of the measurement (default: 8, or the largest of 4, 2, 1 that divides)",
    )
    ap.add_argument(
        "--overrides",
        type=json_object,
        default=None,
        help="JSON merged into the preset (default: the preset as it is)",
    )
    ap.add_argument(
        "--trainable",
        type=json_object,
        default=None,
        help='JSON merged into the stage\'s trainable parts, e.g. \'{"vision": "frozen"}\' '
        "(default: the stage's own)",
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def main(argv: list[str] | None = None) -> int:
    """`m3d-lit plan`: print the estimate; exit 0 whether or not it fits."""
    args = vars(_parser().parse_args(argv))
    as_json = args.pop("json")
    if args["model"] is not None:
        args["model"] = str(args["model"])
    settings = PlanSettings(**{k.replace("-", "_"): v for k, v in args.items()})
    with model_options("--overrides/--trainable"):
        result = plan(settings)
        result["advice"] = fit_advice(settings, result)
    print(json.dumps(result, indent=2) if as_json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
