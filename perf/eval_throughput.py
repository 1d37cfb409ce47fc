"""Questions per second of `m3d-lit eval` on the demo's CQ500 test split: the Predictor against the calls
`eval` made before it (main at da0b387), at batch 1 (the official evaluation's loop) and larger.

.venv/bin/python perf/eval_throughput.py [--checkpoint runs/demo/runs/stage3] [--data runs/demo/data/cq500]
                                        [--batches 1 8 48] [--limit N] [--threads 1]

Both paths run here, in one process, on the same model and the same questions, one after the other:
- `before`: what `eval` did on main: a DataLoader of `LMCollator` batches, the vision encoder and the
  perceiver run for every question, every row decoding until the last row of its batch stops, LoRA
  unmerged (the decode loop is main's `LamedModel.generate`, copied below as it was);
- `after`: `Predictor.load` + `prediction_records` (visual tokens once per scan, finished rows leave
  the batch, LoRA merged).
Answers are compared with `before` at batch 1, question by question. The last stdout line is JSON.
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


@torch.no_grad()
def main_generate(model: Any, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int) -> list[str]:  # fmt: skip
    """main's `LamedModel.generate` (greedy): every row decodes until the whole batch is done."""
    from m3d_lit.losses import at_least_fp32
    from m3d_lit.models.lamed import _new_cache, _positions

    batch, pad = input_ids.shape[0], model.tokenizer.pad_token_id
    stops = torch.tensor(model.stop_ids)
    positions = _positions(attention_mask)
    hidden, cache = model.decode(
        model.embed(images, input_ids), attention_mask, positions, cache=_new_cache()
    )
    hidden, done, steps = hidden[:, -1], torch.zeros(batch, dtype=torch.bool), []
    for _ in range(max_new_tokens):
        next_ids = at_least_fp32(model.logits(hidden)).argmax(-1)
        next_ids = torch.where(done, torch.full_like(next_ids, pad), next_ids)
        steps.append(next_ids)
        done = done | torch.isin(next_ids, stops)
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
        hidden, cache = model.decode(model.token_embeds(next_ids[:, None]), attention_mask, positions, cache)
        hidden = hidden[:, -1]
    return [model._detokenize(model._until_stop(row)).strip() for row in torch.stack(steps, dim=1).tolist()]


def before(checkpoint: str, dataset: Any, batch: int, max_new_tokens: int) -> tuple[float, list[str]]:
    from torch.utils.data import DataLoader

    from m3d_lit.data.collate import make_collator
    from m3d_lit.inference.loading import load_model

    model = load_model(checkpoint).model  # as main's load_task gave it: fp32, LoRA unmerged
    loader = DataLoader(dataset, batch_size=batch, collate_fn=make_collator(model, generation=True))
    start, answers = time.perf_counter(), []
    for prompt in loader:
        answers += main_generate(model, prompt["images"], prompt["input_ids"], prompt["attention_mask"],
                                 max_new_tokens)  # fmt: skip
    return time.perf_counter() - start, answers


def after(checkpoint: str, dataset: Any, batch: int, max_new_tokens: int) -> tuple[float, list[str]]:
    from m3d_lit.inference.predictor import Predictor
    from m3d_lit.inference.records import prediction_records

    predictor = Predictor.load(checkpoint, "cpu", "float32", max_new_tokens)
    start = time.perf_counter()
    answers = [r["prediction"] for r in prediction_records(predictor, dataset, batch)]
    return time.perf_counter() - start, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo/runs/stage3")
    parser.add_argument("--data", default="runs/demo/data/cq500")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 48])
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from m3d_lit.commands.evaluate import qa_file
    from m3d_lit.data.datasets import QAJsonlDataset
    from m3d_lit.inference.loading import load_model

    img_size = load_model(args.checkpoint).model.img_size
    dataset = QAJsonlDataset(qa_file(__import__("pathlib").Path(args.data)), img_size=img_size)
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    n, rows, reference = len(dataset), [], None
    for batch in args.batches:
        for name, run in (("before", before), ("after", after)):
            seconds, answers = run(args.checkpoint, dataset, batch, args.max_new_tokens)
            reference = answers if reference is None else reference
            differ = sum(a != b for a, b in zip(answers, reference))
            rows.append({"path": name, "batch": batch, "seconds": round(seconds, 2),
                         "questions_per_s": round(n / seconds, 2), "answers_differing": differ})  # fmt: skip
            rate = f"{n / seconds:7.2f} questions/s ({seconds / n:.4f} s/question)"
            print(f"{name:<7} batch {batch:>3}: {rate}, "
                  f"{differ} of {n} answers differ from `before` at batch 1", flush=True)  # fmt: skip
    base = rows[0]["questions_per_s"]
    for row in rows:
        row["speedup_over_before_batch1"] = round(row["questions_per_s"] / base, 2)
    print(json.dumps({"questions": n, "threads": args.threads, "load": os.getloadavg(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
