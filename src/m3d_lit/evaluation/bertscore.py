"""BERTScore F1 from a local model directory, as the `bert_score` package (behind Hugging Face `evaluate`'s
`bertscore`, which M3D's `eval_vqa.py` calls with `lang="en"`) computes it without idf or baseline rescaling.

Each text (stripped) is encoded with the model's special tokens; its token vectors are the hidden states
after layer `layer`, L2-normalised. Precision is the mean over the prediction's tokens of the best cosine
similarity with any reference token, recall the reverse, F1 their harmonic mean. The special tokens
([CLS]/[SEP], <s>/</s>) may be matched but carry no weight, and a text with no other token scores 0, as
in `bert_score`. `evaluate` uses roberta-large at layer 17; a local copy of it gets that layer by default.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from m3d_lit.errors import InputError

__all__ = ["bertscore_f1", "default_layer"]

# bert_score prepends a space to the first word for byte-level BPE tokenizers (as inside a sentence)
_PREFIX_SPACE = ("roberta", "gpt2", "bart", "longformer", "deberta")


def default_layer(config: Any) -> int:
    """17 for a roberta-large (what `evaluate` uses for English), else the model's last layer."""
    if config.model_type == "roberta" and config.num_hidden_layers == 24:
        return 17
    return int(config.num_hidden_layers)


@functools.lru_cache(maxsize=2)
def _load(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise InputError(folder, "is not a local model directory (no config.json) for --bertscore-model")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        extra = {"add_prefix_space": True} if config.model_type in _PREFIX_SPACE else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise InputError(folder, f"cannot load it as a BERTScore model: {str(err).splitlines()[0]}") from None
    return tokenizer, model


@torch.no_grad()
def _embed(texts: list[str], tokenizer: Any, model: Any, layer: int, batch_size: int) -> list[tuple]:
    """Per text: (T x H normalised float64 token vectors, T weights: 0 for special tokens, else 1)."""
    special = set(tokenizer.all_special_ids)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        enc = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer].double()
        for row in range(len(chunk)):
            keep = enc["attention_mask"][row].bool()
            vectors = torch.nn.functional.normalize(hidden[row][keep], dim=-1)
            ids = enc["input_ids"][row][keep].tolist()
            out.append(
                (vectors, torch.tensor([0.0 if i in special else 1.0 for i in ids], dtype=torch.float64))
            )
    return out


def _f1(pred: tuple, ref: tuple) -> float:
    (hyp_vec, hyp_w), (ref_vec, ref_w) = pred, ref
    if hyp_w.sum() == 0 or ref_w.sum() == 0:
        return 0.0
    sim = hyp_vec @ ref_vec.T
    precision = float((sim.max(dim=1).values * hyp_w).sum() / hyp_w.sum())
    recall = float((sim.max(dim=0).values * ref_w).sum() / ref_w.sum())
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def bertscore_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    model_dir: str | Path,
    layer: int | None = None,
    batch_size: int = 32,
) -> list[float]:
    """Per-sample BERTScore F1 of each prediction against its reference (see the module docstring)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    tokenizer, model = _load(str(Path(model_dir).resolve()))
    chosen = default_layer(model.config) if layer is None else layer
    if not 1 <= chosen <= model.config.num_hidden_layers:
        raise InputError(
            model_dir, f"has {model.config.num_hidden_layers} layers; --bertscore-layer {chosen}"
        )
    texts = sorted({t.strip() for t in (*predictions, *references)})
    vectors = dict(zip(texts, _embed(texts, tokenizer, model, chosen, batch_size)))
    return [_f1(vectors[p.strip()], vectors[r.strip()]) for p, r in zip(predictions, references)]
