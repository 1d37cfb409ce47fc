"""Training steps per second and peak RSS on CPU, per preset and stage (fp32, AdamW, synthetic batches);
with `--fit`, a step of `m3d-lit fit` against the bare step of the same model on the same batches.

.venv/bin/python perf/train_step.py --presets tiny small --stages 1 2 3 --steps 4 --batch 2
.venv/bin/python perf/train_step.py --fit --steps 12 --batch 8

Each (preset, stage) runs in its own process so its peak RSS (`ru_maxrss`) is its own. Stage 1 trains
the CLIP model (ViT + text encoder), stages 2 and 3 the LaMed model with the stage's trainability on
full-length rows (`max_length` tokens, stage 3 with a `[SEG]` row so the segmentation module runs).
One warm-up step is not timed. The last stdout line is JSON.

`--fit` (`fit_overhead.py`) times stage 3 of the tiny preset on prepared files both ways, alternating
runs in one process so that the machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _clip_step(preset: str, batch: int) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    from m3d_lit.losses.contrastive import clip_loss
    from m3d_lit.models.clip import build_clip
    from m3d_lit.models.presets import STAGE_TRAINABLE

    model = build_clip(preset)
    model.set_trainable(STAGE_TRAINABLE[1])
    length = int(model.config["clip"]["max_length"])
    vocab = len(model.text_tokenizer)
    inputs = {
        "images": torch.rand(batch, 1, *model.vision.img_size),
        "input_ids": torch.randint(5, vocab, (batch, length)),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }
    return model, inputs, lambda out: clip_loss(*out)


def _lamed_step(preset: str, stage: int, batch: int) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    from m3d_lit.models.build import build_lamed
    from m3d_lit.models.plan import synthetic_batch
    from m3d_lit.models.presets import STAGE_TRAINABLE

    model = build_lamed(preset)
    model.set_trainable(STAGE_TRAINABLE[stage])
    inputs = synthetic_batch(model, batch, model.max_length, seg=stage == 3)
    return model, inputs, lambda out: out["loss"]


def run_one(preset: str, stage: int, steps: int, batch: int) -> dict[str, Any]:
    """Time `steps` optimizer steps of one preset and stage in this process."""
    torch.manual_seed(0)
    if stage == 1:
        model, inputs, loss_of = _clip_step(preset, batch)
    else:
        model, inputs, loss_of = _lamed_step(preset, stage, batch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(**inputs))
        loss.backward()
        optimizer.step()
        return float(loss)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {
        "preset": preset,
        "stage": stage,
        "batch": batch,
        "steps": steps,
        "steps_per_s": steps / seconds,
        "samples_per_s": steps * batch / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": sum(p.numel() for p in params),
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=(1, 2, 3))
    ap.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("PRESET", "STAGE"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see perf/README.md)")
    ap.add_argument("--fit", action="store_true", help="m3d-lit fit against the bare step (stage 3, tiny)")
    ap.add_argument("--rounds", type=int, default=2, help="with --fit: alternating runs of each kind")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch < 1:
        raise ValueError(f"--steps {args.steps} and --batch {args.batch} must be >= 1")
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps, args.batch)))
        return 0
    if args.fit:
        from fit_overhead import compare

        print(json.dumps({"train_step": compare(args.steps, args.batch, args.rounds)}))
        return 0
    rows = []
    for preset in args.presets:
        for stage in args.stages:
            cmd = [sys.executable, __file__, "--one", preset, str(stage)]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{preset} stage {stage} failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{preset:>6} stage {stage}: {row['steps_per_s']:.2f} steps/s "
                f"({row['samples_per_s']:.2f} samples/s, batch {args.batch}), "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    print(json.dumps({"train_step": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
