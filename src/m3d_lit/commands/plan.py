"""`m3d-lit plan --preset paper --stage 3 --gpu-mem 24 --micro-batch 2`: GPU memory and FLOPs of a stage.

Prints the memory per GPU by part, the largest micro-batch that fits and the FLOPs per sample, as a
table or (`--json`) the whole estimate; `models/plan.py` says how each figure is obtained.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from m3d_lit.commands.arguments import CommandParser, json_object, model_options
from m3d_lit.models.plan import CHECKPOINTING, PlanSettings, plan
from m3d_lit.models.presets import PRESETS

__all__ = ["format_plan", "main"]


def format_plan(result: dict[str, Any]) -> str:
    """A readable table of `plan`'s result."""
    s, f, p = result["settings"], result["flops"], result["params"]
    fwd = ", ".join(f"{n} {v:.2f}" for n, v in f["forward_tflop"].items())
    return "\n".join(
        [
            f"m3d-lit plan: preset {s['preset']}, stage {s['stage']}, micro-batch {s['micro_batch']}, frozen "
            f"{s['frozen_dtype']}, checkpointing {s['checkpointing']}, zero {s['zero']}",
            f"  parameters: {p['frozen'] / 1e9:.3f} B frozen, {p['trainable'] / 1e6:.1f} M trainable",
            *(f"  {name:<26} {gib:8.2f} GiB" for name, gib in result["memory_gib"].items()),
            f"  {'total':<26} {result['total_gib']:8.2f} GiB of {s['gpu_mem']:g}: "
            + ("fits" if result["fits"] else "does NOT fit"),
            f"  per extra sample {result['per_sample_gib']:.2f} GiB; largest micro-batch that fits: "
            f"{result['max_micro_batch']}",
            f"  forward TFLOP/sample: {fwd}",
            f"  training TFLOP/sample: {f['train_model_tflop_per_sample']:.2f} model, "
            f"{f['train_hardware_tflop_per_sample']:.2f} with recompute",
        ]
    )


def _parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="m3d-lit plan", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    ap.add_argument("--stage", type=int, default=3, choices=(2, 3))
    ap.add_argument("--gpu-mem", type=float, default=24.0, help="GiB per GPU")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--frozen-dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--full-embeddings", action="store_true", help="train whole embedding/output matrices")
    ap.add_argument(
        "--checkpointing",
        default="llm",
        help=f"{' | '.join(CHECKPOINTING)}, or parts joined by commas (e.g. vision,seg)",
    )
    ap.add_argument("--lora-dropout", type=float, default=None)
    ap.add_argument("--zero", type=int, choices=(0, 1, 2), default=0, help="optimizer state sharding")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs sharing the optimizer state with --zero")
    ap.add_argument("--seg-share", type=float, default=None, help="share of rows that segment")
    ap.add_argument("--reserve", type=float, default=1.0, help="GiB for CUDA context and allocator slack")
    ap.add_argument("--width-divisor", type=int, default=None, help="LLM width reduction of the measurement")
    ap.add_argument("--overrides", type=json_object, default=None, help="JSON merged into the preset")
    ap.add_argument("--trainable", type=json_object, default=None, help='JSON, e.g. \'{"vision": "frozen"}\'')
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def main(argv: list[str] | None = None) -> int:
    """`m3d-lit plan`: print the estimate; exit 0 whether or not it fits."""
    args = vars(_parser().parse_args(argv))
    as_json = args.pop("json")
    settings = PlanSettings(**{k.replace("-", "_"): v for k, v in args.items()})
    with model_options("--overrides/--trainable"):
        result = plan(settings)
    print(json.dumps(result, indent=2) if as_json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
