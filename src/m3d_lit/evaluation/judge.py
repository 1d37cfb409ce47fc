"""The LLM judge (M3D-Bench's LLM-based evaluation), offline: a local causal LM scores answers 0-10.

Each record's `prediction` is scored against its `answer` (the reference), with its `question` when it
has one, by one fixed prompt (`JUDGE_PROMPT`). The judge is any Hugging Face causal LM directory, loaded
with `local_files_only=True` and never `trust_remote_code`; nothing contacts a service. A tokenizer with
a chat template gets the prompt as one user message (instruction-tuned judges answer far more reliably
that way); one without gets the plain text, which ends in `Score:`. Generation is greedy, batched and
left-padded; fp32 on CPU, bf16 on CUDA. Reply parsing is `parse_score`; the mean skips unparsable
replies and says how many there were.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from m3d_lit.errors import InputError

__all__ = ["JUDGE_PROMPT", "aggregate", "build_prompts", "judge", "load_judge", "parse_score"]

JUDGE_PROMPT = (
    "You are an expert radiologist grading an AI system's answer about a CT scan.\n"
    "Compare the generated answer with the reference answer and rate how well its medical content "
    "matches the reference, on a scale from 0 (wrong or unrelated) to 10 (the same findings). "
    "Ignore differences in wording.\n"
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Generated answer: {prediction}\n"
    "Reply with the score only, a number from 0 to 10.\n"
    "Score:"
)
# Bounds the prompt when a model rambles until max_new_tokens; far longer than any report here.
MAX_TEXT_CHARS = 4000

_NUM = r"-?\d+(?:\.\d+)?"
# `(?!\.?\d)` keeps numbers whole yet lets a sentence end right after one ("7/10.").
_OUT_OF = re.compile(rf"({_NUM})\s*(?:/|out\s+of)\s*10(?!\.?\d)", re.IGNORECASE)
_AFTER_SCORE = re.compile(rf"\bscore\b[^\d\n-]{{0,12}}?({_NUM})(?!\.?\d)", re.IGNORECASE)
_LEADING = re.compile(rf"^\W*?({_NUM})(?!\.?\d)")
_ANY = re.compile(rf"(?<![\d.]){_NUM}(?!\.?\d)")


def parse_score(reply: str) -> float | None:
    """The 0-10 score in a judge's reply, or None when it holds no single clear score.

    Tried in order: `N/10` or `N out of 10`; a number after the word "score" (`Score: 7`, `**Score**: 8`);
    a number opening the reply (`7. The answer...`); the only number in the reply (`I'd give it 6.`).
    A score outside [0, 10] is refused (None), not clamped: it means the judge misread the scale.
    """
    for pattern in (_OUT_OF, _AFTER_SCORE, _LEADING):
        match = pattern.search(reply)
        if match:
            return _in_range(match.group(1))
    numbers = _ANY.findall(reply)
    return _in_range(numbers[0]) if len(numbers) == 1 else None


def _in_range(text: str) -> float | None:
    value = float(text)
    return value if 0.0 <= value <= 10.0 else None


def aggregate(replies: Sequence[str]) -> dict[str, Any]:
    """`judge_mean` over the parsable replies (None if none), `judge_n`, `judge_unparsable`, `scores`."""
    scores = [parse_score(reply) for reply in replies]
    parsed = [s for s in scores if s is not None]
    return {
        "judge_mean": sum(parsed) / len(parsed) if parsed else None,
        "judge_n": len(scores),
        "judge_unparsable": len(scores) - len(parsed),
        "scores": scores,
    }


def _check_records(records: Sequence[Mapping[str, Any]]) -> None:
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"record {i} must be a mapping, got {type(record).__name__}")
        for key in ("prediction", "answer"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"record {i} needs a string {key!r}, got {record.get(key)!r}")


def build_prompts(tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The judge's input text per record: `JUDGE_PROMPT` filled in, through the chat template if any."""
    _check_records(records)
    prompts = []
    for record in records:
        text = JUDGE_PROMPT.format(
            question=str(record.get("question") or "(none)")[:MAX_TEXT_CHARS],
            reference=record["answer"].strip()[:MAX_TEXT_CHARS],
            prediction=record["prediction"].strip()[:MAX_TEXT_CHARS],
        )
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        prompts.append(text)
    return prompts


def load_judge(model_dir: str | Path, device: torch.device) -> tuple[Any, Any]:
    """The judge's (model, tokenizer) from a local directory, in eval mode on `device`, left-padding.

    Args:
        model_dir: a Hugging Face causal LM directory (config, weights, tokenizer files).
        device: where to run it; CUDA loads bf16, anything else fp32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(path, "judge model directory not found")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False, dtype=dtype
        )
    except (OSError, ValueError, KeyError) as err:
        raise InputError(path, f"not a loadable local causal LM with its tokenizer ({err})") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(path, "the tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding keeps every prompt's last token at the end, where generation continues.
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def _generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    from transformers import GenerationConfig

    # A chat template writes its own BOS; the tokenizer must not add a second one.
    add_special = not getattr(tokenizer, "chat_template", None)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id
        if tokenizer.eos_token_id is not None
        else model.config.eos_token_id,
    )
    out = model.generate(**enc, generation_config=config)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def judge(
    records: Sequence[Mapping[str, Any]],
    model_dir: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Score every record's `prediction` against its `answer` with the local judge model.

    Returns `aggregate`'s dict (`judge_mean`, `judge_n`, `judge_unparsable`, `scores` in record order)
    plus `replies`, the raw judge texts. Pass only the records worth judging (reports, open answers).

    Args:
        records: mappings with string `prediction` and `answer`, optionally `question`.
        model_dir: the judge's local Hugging Face directory (`--judge PATH`).
        batch_size: prompts generated together.
        max_new_tokens: reply length; a score needs only a few tokens.
        device: "cpu", "cuda", ...; None picks CUDA when available.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    _check_records(records)
    if not Path(model_dir).is_dir():
        raise InputError(model_dir, "judge model directory not found")
    if not records:
        return {**aggregate([]), "replies": []}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_judge(model_dir, device)
    prompts = build_prompts(tokenizer, records)
    # Batches of similar length waste less compute on padding; replies go back to record order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, reply in zip(chunk, _generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens)):
            replies[i] = reply.strip()
    return {**aggregate(replies), "replies": replies}
