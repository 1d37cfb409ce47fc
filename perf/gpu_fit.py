"""Does paper stage 3 fit a 24 GB GPU? Peak memory, samples/s and MFU of real training steps.

.venv/bin/python perf/gpu_fit.py                      # GPU: paper preset, cap 24 GiB, micro-batch 1 2 4
.venv/bin/python perf/gpu_fit.py --smoke              # CPU: tiny preset, 2 steps, same code path

The paper preset is built with random weights (LLaMA-2-7B dimensions, no download) directly on the
device: frozen parameters in bf16, trainable ones (ViT, perceiver, LoRA, new token rows, segmentation)
in fp32, steps under bf16 autocast with AdamW: the layout of `precision: bf16-mixed` with a bf16 frozen
LLM. The process is capped with `torch.cuda.set_per_process_memory_fraction`, so a 24 GB card is
mimicked on a larger one. Every row ends with `[SEG]` (the segmentation module runs: the worst case)
unless `--no-seg`. Per micro-batch: `--steps` steps, the first two untimed; peak allocated and reserved
memory; samples/s; MFU = model FLOPs (plan's count, no recompute) x samples/s / the card's dense bf16
peak. Beside each, `m3d-lit plan`'s estimate with the same settings (reserve 0). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Dense bf16 tensor FLOP/s (fp32 accumulate) by device-name fragment; the first match wins.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "4090": 165.0, "L40S": 362.0}
WARMUP = 2


def _peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def build(preset: str, device: torch.device, checkpointing: str) -> torch.nn.Module:
    """Stage-3 model with random weights: frozen bf16, trainable fp32, non-reentrant checkpointing."""
    from m3d_lit.models.blocks import checkpoint_parts
    from m3d_lit.models.build import build_lamed
    from m3d_lit.models.lamed import cast_for_training
    from m3d_lit.models.presets import STAGE_TRAINABLE

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # a 7B model made in fp32 would not fit the cap
    try:
        with torch.device(device):
            model = build_lamed(preset)
            model.set_trainable(STAGE_TRAINABLE[3])
    finally:
        torch.set_default_dtype(default)
    cast_for_training(model).train()
    parts = checkpoint_parts(checkpointing)
    model.enable_gradient_checkpointing(llm="llm" in parts, vision="vision" in parts, seg="seg" in parts)
    return model


def run_micro_batch(model: torch.nn.Module, micro_batch: int, steps: int, seg: bool) -> dict[str, Any]:
    """`steps` AdamW steps at `micro_batch`; peak memory and samples/s of the timed ones."""
    from m3d_lit.models.plan import synthetic_batch

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in synthetic_batch(model, micro_batch, model.max_length, seg).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(steps):
            if step == WARMUP:
                _sync(cuda)
                start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**batch)["loss"]
            loss.backward()
            optimizer.step()
        _sync(cuda)
    except torch.OutOfMemoryError as err:
        return {"micro_batch": micro_batch, "oom": True, "error": str(err).splitlines()[0]}
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    seconds = time.perf_counter() - start
    row = {"micro_batch": micro_batch, "oom": False, "loss": float(loss.detach())}
    row["samples_per_s"] = (steps - WARMUP) * micro_batch / seconds
    if cuda:
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return row


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _estimate(preset: str, checkpointing: str, seg: bool) -> dict[str, float]:
    from m3d_lit.models.plan import PlanSettings, plan

    result = plan(
        PlanSettings(
            preset=preset, micro_batch=1, checkpointing=checkpointing, reserve=0.0, seg_share=float(seg)
        )
    )
    return {
        "total_gib_mb1": result["total_gib"],
        "per_sample_gib": result["per_sample_gib"],
        "train_model_flops": result["flops"]["train_model_tflop_per_sample"] * 1e12,
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument(
        "--steps", type=int, default=10, help=f"steps per micro-batch, the first {WARMUP} untimed"
    )
    ap.add_argument("--cap-gib", type=float, default=24.0, help="per-process GPU memory cap")
    ap.add_argument(
        "--checkpointing",
        nargs="+",
        default=["llm", "all"],
        help="modes to run in turn (none, all, or llm, vision, seg joined by commas); all of them must "
        "agree on the LLM (llm + all, or none + vision)",
    )
    ap.add_argument("--no-seg", action="store_true", help="rows without [SEG]: the segmentation module idles")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, micro-batch 1 2, 3 steps")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.preset, args.micro_batches, args.steps = "tiny", [1, 2], WARMUP + 1
        torch.set_num_threads(1)  # shared CPUs: see perf/README.md
    from m3d_lit.models.blocks import checkpoint_parts

    llm_modes = {"llm" in checkpoint_parts(mode) for mode in args.checkpointing}
    if len(llm_modes) != 1:
        raise ValueError(f"--checkpointing {args.checkpointing}: the modes disagree on the LLM")
    if args.steps <= WARMUP or min(args.micro_batches) < 1:
        raise ValueError(f"--steps {args.steps} must exceed {WARMUP}; micro-batches must be >= 1")
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("perf/gpu_fit.py: no CUDA device; use --smoke for the CPU check")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    estimates = {m: _estimate(args.preset, m, not args.no_seg) for m in args.checkpointing}
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
    start = time.perf_counter()
    model = build(args.preset, device, args.checkpointing[0])
    build_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    print(f"built {args.preset} on {device} in {build_s:.0f} s; weights {weights} GiB", flush=True)
    peak = _peak_tflops(device, args.peak_tflops)
    rows = []
    for mode in args.checkpointing:
        parts = checkpoint_parts(mode)
        model.vision.gradient_checkpointing = "vision" in parts
        model.segmentation.image_encoder.gradient_checkpointing = "seg" in parts
        estimate = estimates[mode]
        for mb in args.micro_batches:
            row = {"checkpointing": mode, **run_micro_batch(model, mb, args.steps, not args.no_seg)}
            row["plan_gib"] = estimate["total_gib_mb1"] + estimate["per_sample_gib"] * (mb - 1)
            if not row["oom"] and peak:
                row["mfu"] = estimate["train_model_flops"] * row["samples_per_s"] / (peak * 1e12)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "preset": args.preset,
        "cap_gib": args.cap_gib if cuda else None,
        "checkpointing": args.checkpointing,
        "seg": not args.no_seg,
        "weights_gib": weights,
        "build_s": build_s,
        "peak_tflops": peak,
        "train_model_tflop_per_sample": {m: e["train_model_flops"] / 1e12 for m, e in estimates.items()},
        "rows": rows,
    }
    print(json.dumps({"gpu_fit": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
