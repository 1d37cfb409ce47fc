"""Tokens per second of batched generation (`LamedModel.generate`) on the tiny model, fp32 CPU.

.venv/bin/python perf/generate.py --batches 1 4 8 16 --new-tokens 32

Random weights, greedy decoding, with EOS suppressed in the LM head so every row generates exactly
`--new-tokens` tokens (a random model would otherwise stop rows at random points). Per batch size:
the whole call (prefill with the image encoder, then decoding) and the decode steps alone (time of a
`--new-tokens` call minus a 1-token call). The last stdout line is JSON.
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


def _suppress_eos(model: torch.nn.Module) -> None:
    from m3d_lit.models.llm import unwrap

    eos = model.tokenizer.eos_token_id

    def hook(_m: torch.nn.Module, _a: tuple, out: torch.Tensor) -> torch.Tensor:
        out[..., eos] = float("-inf")
        return out

    unwrap(model.llm).get_output_embeddings().register_forward_hook(hook)


def _timed(model: torch.nn.Module, prompt: dict[str, torch.Tensor], new_tokens: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt["images"], prompt["input_ids"], prompt["attention_mask"], new_tokens)
        best = min(best, time.perf_counter() - start)
    return best


def run(preset: str, batches: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Generation throughput per batch size and the speedup of each batch size over batch 1."""
    from m3d_lit.data.collate import LMCollator
    from m3d_lit.models.build import build_lamed

    torch.manual_seed(0)
    model = build_lamed(preset).eval()
    _suppress_eos(model)
    collate = LMCollator(model.tokenizer, model.num_visual_tokens, model.max_length, model.img_size, True)
    questions = ["Is there a bleed?", "Where is the hemorrhage located in this scan?", "Any fracture?"]
    rows = []
    for batch in batches:
        items = [
            {"id": str(i), "image": torch.rand(1, *model.img_size), "question": questions[i % 3],
             "answer": "", "kind": "open", "mask": None, "dataset": "bench"}
            for i in range(batch)
        ]  # fmt: skip
        prompt = collate(items)
        full = _timed(model, prompt, new_tokens, repeats)
        first = _timed(model, prompt, 1, repeats)
        rows.append(
            {
                "batch": batch,
                "seconds": full,
                "tokens_per_s": batch * new_tokens / full,
                "decode_tokens_per_s": batch * (new_tokens - 1) / max(full - first, 1e-9),
                "prefill_seconds": first,
            }
        )
    base = next((r for r in rows if r["batch"] == 1), rows[0])
    for row in rows:
        row["speedup_vs_1"] = row["tokens_per_s"] / base["tokens_per_s"]
    return {"preset": preset, "new_tokens": new_tokens, "rows": rows}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many calls")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see perf/README.md)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.new_tokens < 2 or min(args.batches) < 1 or args.repeats < 1:
        raise ValueError(f"--new-tokens {args.new_tokens} must be >= 2, batches and repeats >= 1")
    result = run(args.preset, args.batches, args.new_tokens, args.repeats)
    for row in result["rows"]:
        print(
            f"batch {row['batch']:>3}: {row['tokens_per_s']:8.1f} tokens/s "
            f"(decode alone {row['decode_tokens_per_s']:8.1f}, prefill {row['prefill_seconds']:.2f} s), "
            f"x{row['speedup_vs_1']:.2f} vs batch 1",
            flush=True,
        )
    print(json.dumps({"generate": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
