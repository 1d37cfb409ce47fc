"""LLM tokens computed per real token when M3D-Cap captions train beside M3D-VQA questions, with the
plain mix and with `group_by_length`, side by side.

.venv/bin/python perf/padding.py --samples 4800 --ranks 8 --batch 12

A stage-3 mix at the paper's sizes: 256 visual tokens, rows of at most 512 tokens, `--batch` rows per rank
and `--ranks` ranks drawing from `MixSampler` (Cap and VQA weighted 1 : 1). Captions are M3D-Cap-like
reports: 4 to 40 sentences of the shipped brain-CT corpus (about 40 to 450 tokens); VQA rows are the
synthetic M3D-VQA's closed questions (question with four choices, answer `A. x`). Every batch is collated
by the real `LMCollator` (rows padded to the longest of their batch), tokenised by the built-in
tokenizer. "computed" counts batch rows x padded width per rank, "real" the attention mask; the ratio is
what padding costs the LLM. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from importlib import resources
from typing import Any

import torch
from torch.utils.data import Dataset

from m3d_lit.data.collate import LMCollator
from m3d_lit.data.datasets import SampleKey
from m3d_lit.data.records import CAPTION_PROMPTS
from m3d_lit.data.sampling import MixDataset, MixSampler
from m3d_lit.data.synthetic_m3d import vqa_rows
from m3d_lit.models.tokenizer import build_llm_tokenizer

VISUAL_TOKENS, MAX_LENGTH = 256, 512
IMAGE = torch.zeros(1, 1, 1, 1)  # the LLM's tokens are what is measured; the volume is a stand-in


class _Texts(Dataset):
    """(question, answer) rows as training items; `lengths()` as `RecordDataset.lengths` (characters)."""

    def __init__(self, rows: list[tuple[str, str]], kind: str) -> None:
        self.rows, self.kind = rows, kind

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        question, answer = self.rows[key.index]
        return {"id": f"{self.kind}{key.index}", "image": IMAGE, "question": question, "answer": answer,
                "kind": self.kind, "mask": None, "dataset": self.kind}  # fmt: skip

    def lengths(self) -> list[int]:
        return [len(q) + len(a) for q, a in self.rows]


def _sources(count: int, seed: int) -> dict[str, _Texts]:
    rng = random.Random(seed)
    corpus = resources.files("m3d_lit").joinpath("assets", "brain_ct_corpus.txt").read_text(encoding="utf-8")
    sentences = [line.strip() for line in corpus.splitlines()[1:] if line.strip()]
    captions = [
        (rng.choice(CAPTION_PROMPTS), " ".join(rng.choices(sentences, k=rng.randint(4, 40))))
        for _ in range(count)
    ]
    vqa = []
    while len(vqa) < count:
        truth = {"ICH": rng.randint(0, 1), "IPH": rng.randint(0, 1), "BleedLocation-Left": rng.randint(0, 1)}
        for row in vqa_rows("image.npy", "", truth, rng):
            question = f"{row[3]} Choices: A. {row[4]} B. {row[5]} C. {row[6]} D. {row[7]}"
            vqa.append((question, f"{row[9]}. {row[8]}"))
    return {"cap": _Texts(captions, "caption"), "vqa": _Texts(vqa[:count], "closed")}


def measure(sources: dict[str, _Texts], ranks: int, batch: int, samples: int, grouped: bool) -> dict:
    """Computed and real LLM tokens of one epoch of the mix on `ranks` ranks."""
    tokenizer = build_llm_tokenizer(None)
    collate = LMCollator(tokenizer, VISUAL_TOKENS, MAX_LENGTH, (1, 1, 1))
    mix = MixDataset(sources)
    grouping = {"lengths": mix.lengths(), "group_size": batch * ranks} if grouped else {}
    computed = real = steps = 0
    slowest = 0  # per step, the widest batch over the ranks: what every rank waits for
    shards = [
        [key for key in MixSampler(mix, [1.0, 1.0], samples, ranks, rank, seed=0, **grouping)]
        for rank in range(ranks)
    ]
    for step in range(len(shards[0]) // batch):
        widths = []
        for shard in shards:
            rows = collate([mix[key] for key in shard[step * batch : (step + 1) * batch]])
            computed += rows["input_ids"].numel()
            real += int(rows["attention_mask"].sum())
            widths.append(rows["input_ids"].shape[1])
        slowest += max(widths) * batch * ranks
        steps += 1
    return {"grouped": grouped, "steps": steps, "computed_tokens": computed, "real_tokens": real,
            "computed_per_real": computed / real, "slowest_rank_per_real": slowest / real}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4800, help="samples per epoch over all ranks")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=12, help="rows per rank per step (the stage-3 recipe's)")
    args = ap.parse_args(argv)
    sources = _sources(args.samples, seed=0)
    rows = [measure(sources, args.ranks, args.batch, args.samples, grouped) for grouped in (False, True)]
    for row in rows:
        print(
            f"{'grouped by length' if row['grouped'] else 'plain mix':>18}: {row['computed_per_real']:.2f} LLM "
            f"tokens computed per real token ({row['slowest_rank_per_real']:.2f} counting each step at its "
            f"slowest rank), {row['steps']} steps",
            flush=True,
        )
    print(json.dumps({"padding": rows, "settings": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
