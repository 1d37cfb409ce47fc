"""Does paper stage 3 fit a 24 GB GPU? Peak memory, samples/s, tokens/s and MFU of `m3d-lit fit` itself.

.venv/bin/python perf/gpu_fit.py                      # GPU: paper preset, cap 24 GiB, micro-batch 1 2 4
.venv/bin/python perf/gpu_fit.py --smoke              # CPU: tiny preset, 2 micro-batches, same code path

Each (checkpointing, micro-batch) runs `m3d-lit fit -c stage3` in its own process: the whole loop with
Lightning, the strategy, the precision plugin and the data loader, on generated `prepare` data at the
preset's volume size whose rows fill the context (`<im_patch>` x N + a question + an answer ending in
`[SEG]`, with a mask, so the segmentation module runs: the worst case; `--no-seg` answers without it).
The paper preset is built with random LLaMA-2-7B weights (`--model.random_llm true`) through the `gpu1`
preset (bf16-mixed, the frozen LLM made in bf16 on the GPU), one micro-batch per optimizer step. The process is capped with `torch.cuda.set_per_process_memory_fraction` so a
24 GB card is mimicked on a larger one. The figures are those the recipes' `ThroughputLogger` writes to
TensorBoard (`throughput/*`, the last log interval: the first batch is left out) and the peak allocated
memory and the host's peak RSS of the process, beside `m3d-lit plan`'s estimate with the same settings.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback

PERF = Path(__file__).resolve().parent
WORDS = "the scan shows a dense collection over the left convexity with mass effect and midline shift".split()


class PeakMemory(Callback):
    """Cap this process's CUDA memory at `cap_gib` and write the peak allocated and reserved GiB to `path`."""

    def __init__(self, path: str, cap_gib: float = 24.0) -> None:
        self.path, self.cap_gib = Path(path), cap_gib

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.cap_gib * 2**30 / total), device)
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        device = trainer.strategy.root_device
        cuda = device.type == "cuda"
        peak = {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
            # this rank's host memory high-water mark (Linux: KiB)
            "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        self.path.write_text(json.dumps(peak))


def write_data(root: Path, size: tuple[int, ...], rows: int, words: int, seg: bool) -> None:
    """A `prepare` folder: float16 volumes, masks and QA rows whose answers have `words` words."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    answer = " ".join(WORDS[i % len(WORDS)] for i in range(words)) + (" It is [SEG]." if seg else ".")
    lines = []
    for i in range(rows):
        np.save(root / "images" / f"s{i}.npy", rng.random((1, *size), dtype=np.float32).astype(np.float16))
        mask = np.zeros((1, *size), dtype=np.uint8)
        mask[:, : size[0] // 2, : size[1] // 2, : size[2] // 2] = 1
        np.save(root / "masks" / f"s{i}.npy", mask)
        lines.append({"id": f"s{i}", "image": f"images/s{i}.npy", "mask": f"masks/s{i}.npy", "kind": "seg",
                      "question": "Describe and segment the bleed.", "answer": answer, "dataset": "bench"})  # fmt: skip
    (root / "qa_train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def fit(args: argparse.Namespace, data: Path, out: Path, mode: str, micro_batch: int) -> dict[str, Any]:
    """One `m3d-lit fit` run in its own process; its throughput scalars and peak memory."""
    run = out / f"{mode}-mb{micro_batch}"
    monitor = {
        "class_path": "m3d_lit.tasks.throughput.ThroughputLogger",
        "init_args": {"peak_tflops": args.peak_tflops},
    }
    peak = {
        "class_path": "gpu_fit.PeakMemory",
        "init_args": {"path": str(run / "peak.json"), "cap_gib": args.cap_gib},
    }
    trainer = {
        "accelerator": "cpu" if args.smoke else "gpu", "devices": 1,
        "precision": "32-true" if args.smoke else "bf16-mixed",
        "max_steps": args.steps, "log_every_n_steps": args.steps - 1, "limit_val_batches": 0,
        "accumulate_grad_batches": 1,
        "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_checkpointing": False,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(run), "name": "tb", "default_hp_metric": False}},
        "callbacks": [monitor, peak],
    }  # fmt: skip
    overlay = run / "overlay.yaml"
    overlay.parent.mkdir(parents=True)
    overlay.write_text(json.dumps({"trainer": trainer}))
    preset = [] if args.smoke else ["-c", "gpu1"]  # the one-GPU preset, one micro-batch per step here
    argv = [
        "fit", "-c", "stage3", *preset, "-c", str(overlay), "--model.preset", args.preset, "--model.init_from", "null",
        "--model.random_llm", "true", "--model.gradient_checkpointing", mode,
        "--data.roots", json.dumps([str(data)]), "--data.batch_size", str(micro_batch),
        "--data.num_workers", str(args.workers),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PERF), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "m3d_lit.cli", *argv], cwd=run, env=env, capture_output=True, text=True
    )
    row: dict[str, Any] = {"checkpointing": mode, "micro_batch": micro_batch}
    if done.returncode != 0:
        oom = "OutOfMemoryError" in done.stderr or "CUDA out of memory" in done.stderr
        return {**row, "oom": oom, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return {**row, "oom": False, **_scalars(run / "tb"), **json.loads((run / "peak.json").read_text())}


def _scalars(folder: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(folder.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("throughput/")]
    return {t.split("/", 1)[1]: events.Scalars(t)[-1].value for t in tags}


def _estimate(preset: str, mode: str, micro_batch: int, seg: bool) -> dict[str, float]:
    from m3d_lit.models.plan import PlanSettings, plan

    settings = PlanSettings(
        preset=preset, micro_batch=micro_batch, checkpointing=mode, reserve=0.0, seg_share=float(seg)
    )
    result = plan(settings)
    return {
        "plan_gib": result["total_gib"],
        "plan_tflop_per_sample": result["flops"]["train_model_tflop_per_sample"],
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=12, help="steps per run; throughput over steps 2..N")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="per-process GPU memory cap")
    ap.add_argument(
        "--checkpointing",
        nargs="+",
        default=["llm", "all"],
        help="modes to run in turn (none, all, or llm, vision, seg joined by commas); all of them must "
        "agree on the LLM (llm + all, or none + vision)",
    )
    ap.add_argument(
        "--no-seg", action="store_true", help="answers without [SEG]: the segmentation module idles"
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="dense peak of the card (default: its own)"
    )
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, micro-batch 1 2, 3 steps")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.preset, args.micro_batches, args.steps, args.workers = "tiny", [1, 2], 3, 0
        args.checkpointing, args.peak_tflops = args.checkpointing[:1], args.peak_tflops or 1.0
    elif not torch.cuda.is_available():
        raise SystemExit("perf/gpu_fit.py: no CUDA device; use --smoke for the CPU check")
    if args.steps < 3 or min(args.micro_batches) < 1:
        raise ValueError(f"--steps {args.steps} must be >= 3; micro-batches must be >= 1")
    from m3d_lit.models.presets import resolve

    config = resolve(args.preset)
    words = max(1, (config["max_length"] - 256 - 16) // 2) if not args.smoke else 8
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_data(
            data, tuple(config["img_size"]), 2 * max(args.micro_batches) * args.steps, words, not args.no_seg
        )
        for mode in args.checkpointing:
            for mb in args.micro_batches:
                row = {
                    **fit(args, data, Path(tmp) / "runs", mode, mb),
                    **_estimate(args.preset, mode, mb, not args.no_seg),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    device = "cpu" if args.smoke else torch.cuda.get_device_name()
    print(
        json.dumps(
            {"gpu_fit": {"device": device, "preset": args.preset, "cap_gib": args.cap_gib, "rows": rows}}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
