"""What an m3d-lit checkpoint records beyond its weights, and the checks made with it.

A checkpoint's `m3d_lit` entry names the task and holds the fingerprint of the model it was made for
(`base_fingerprint`: preset, resolved configuration, and for an LLM its source and a hash of sampled
frozen weights) and the random-number states of every rank. Frozen LLM weights that come from
`llm_path` are not saved (`frozen_base_keys`); loading rebuilds them from that directory after checking
the fingerprint (`restore_frozen_base`). `task` below is a `BaseTask`, which calls these when it saves,
loads and starts from a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3d_lit.errors import InputError
from m3d_lit.inference.bundle import llm_weights_hash
from m3d_lit.models.presets import fingerprint_config

__all__ = [
    "base_fingerprint",
    "check_init_source",
    "frozen_base_keys",
    "restore_frozen_base",
    "rng_states",
    "set_rng_states",
    "summarise_init",
]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def base_fingerprint(task: Any) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into `task` (computed when the task is built)."""
    config = fingerprint_config(task.hparams.preset, task.hparams.overrides)
    llm = getattr(task.model, "llm", None)
    llm_record = None
    if isinstance(llm, torch.nn.Module):
        path = task.hparams.get("llm_path")
        # `weights_bf16` is the same whatever dtype the LLM was loaded in (a bf16 run, a float32 eval);
        # `weights` is what checkpoints of earlier versions hold
        llm_record = {
            "path": None if path is None else str(path),
            "weights": llm_weights_hash(llm, round_to=None),
            "weights_bf16": llm_weights_hash(llm),
        }
    return {
        "preset": task.hparams.preset,
        "config": _sha(json.dumps(config, sort_keys=True, default=str).encode()),
        "llm": llm_record,
    }


def frozen_base_keys(task: Any) -> list[str]:
    """State-dict keys of frozen LLM weights that `llm_path` can rebuild (none without `llm_path`)."""
    llm = getattr(task.model, "llm", None)
    if not task.hparams.get("llm_path") or not isinstance(llm, torch.nn.Module):
        return []
    named = llm.named_parameters(remove_duplicate=False)
    return sorted(f"model.llm.{n}" for n, p in named if not p.requires_grad and "lora_" not in n)


def _llm_mismatch(saved: dict | None, own: dict | None) -> str | None:
    if saved is None or own is None:
        return None if saved is own else "one of the two models has no LLM"
    if saved["path"] is not None and own["path"] is None:
        return f"it was made with the LLM at {saved['path']!r}; pass that directory as --model.llm_path"
    if saved["path"] is None and own["path"] is not None:
        return f"it was made with a randomly initialised LLM, this model loads {own['path']!r}"
    key = "weights_bf16" if "weights_bf16" in saved and "weights_bf16" in own else "weights"
    if saved[key] != own[key]:
        return (
            f"its base LLM (llm_path {saved['path']!r}, weights {saved[key]}) is not this model's "
            f"(llm_path {own['path']!r}, weights {own[key]})"
        )
    return None


def restore_frozen_base(path: str | Path, checkpoint: dict[str, Any], task: Any) -> None:
    """Check that a checkpoint of this same stage fits `task`, and put back the frozen LLM weights it omits.

    A checkpoint without an `m3d_lit.base` record is left as it is (strict loading then names what
    is missing). Raises `InputError` naming the checkpoint and what differs.
    """
    record = checkpoint.get("m3d_lit") or {}
    saved, own = record.get("base"), task.base_fingerprint
    if saved is None:
        return
    name = f"{type(task).__module__}.{type(task).__qualname__}"
    if record.get("task") not in (None, name):
        raise InputError(
            path,
            f"was written by {record['task']}, not {name}: --ckpt_path only resumes the same stage "
            "(use --model.init_from to start a stage from another one)",
        )
    if saved["preset"] != own["preset"]:
        raise InputError(path, f"was made with preset {saved['preset']!r}; this model uses {own['preset']!r}")
    if saved["config"] != own["config"]:
        raise InputError(
            path, f"was made with another configuration of preset {own['preset']!r} (overrides differ)"
        )
    saved_llm, own_llm = saved.get("llm"), own.get("llm")
    # a random LLM's weights are in the checkpoint itself; only a rebuilt one must be the same model
    both_random = bool(saved_llm and own_llm) and saved_llm["path"] is None and own_llm["path"] is None
    problem = None if both_random else _llm_mismatch(saved_llm, own_llm)
    if problem:
        raise InputError(path, f"does not fit this model: {problem}")
    omitted = record.get("omitted") or []
    state = checkpoint.get("state_dict")
    if omitted and isinstance(state, dict):
        own_state = task.state_dict()
        unknown = [k for k in omitted if k not in own_state]
        if unknown:
            raise InputError(
                path, f"omits {len(unknown)} frozen weights this model lacks, e.g. {unknown[:2]}"
            )
        for key in omitted:
            state.setdefault(key, own_state[key])


def check_init_source(path: str | Path, checkpoint: dict[str, Any], task: Any) -> None:
    """Refuse an `init_from` checkpoint made with another preset or for another base LLM."""
    saved, own = (checkpoint.get("m3d_lit") or {}).get("base"), task.base_fingerprint
    if saved is None:
        return
    if saved["preset"] != own["preset"]:
        raise InputError(path, f"was made with preset {saved['preset']!r}; this model uses {own['preset']!r}")
    if saved.get("llm") is not None and own.get("llm") is not None:
        problem = _llm_mismatch(saved["llm"], own["llm"])
        if problem:
            raise InputError(path, f"was trained against another LLM: {problem}")


def _part(key: str) -> str:
    """`model.segmentation.x.weight` -> `segmentation`; LoRA adapters apart from the LLM they adapt."""
    name = key.split(".")[1] if key.startswith("model.") else key.split(".")[0]
    return f"{name} LoRA" if "lora_" in key else name


def summarise_init(
    own: dict[str, torch.Tensor], source: dict[str, torch.Tensor], loaded: list[str], llm_path: str | None
) -> tuple[dict[str, dict[str, int]], str]:
    """Tensor counts per part, by where each starts: `init_from`, the base LLM, fresh; and in words.

    The base LLM is not taken from `init_from` (`check_init_source` has made sure it is the same model):
    it comes from `llm_path`, or is built from the preset. A part whose weights the checkpoint holds with
    other shapes, or outside an explicit `init_prefixes`, starts fresh and is named as such.
    """
    taken = set(loaded)
    kinds = ("init_from", "base", "fresh", "other shapes", "not selected")
    summary: dict[str, dict[str, int]] = {kind: {} for kind in kinds}
    for key in own:
        part = _part(key)
        if key in taken:
            kind = "init_from"
        elif key in source:
            kind = "other shapes" if source[key].shape != own[key].shape else "not selected"
        elif part == "llm":
            kind = "base"
        else:
            kind = "fresh"
        summary[kind][part] = summary[kind].get(part, 0) + 1

    def listed(kind: str) -> str:
        return ", ".join(f"{part} ({n} tensors)" for part, n in summary[kind].items())

    words = [f"took {listed('init_from')}"]
    if summary["base"]:
        origin = f"llm_path {llm_path}" if llm_path else "the preset (random, as in the checkpoint)"
        words.append(f"from {origin}: {listed('base')}")
    if summary["fresh"]:
        words.append(f"fresh (not in the checkpoint): {listed('fresh')}")
    if summary["other shapes"]:
        words.append(f"fresh (the checkpoint's have other shapes): {listed('other shapes')}")
    if summary["not selected"]:
        words.append(f"fresh (outside init_prefixes): {listed('not selected')}")
    return summary, "; ".join(words)


def rng_states() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python random states, in types `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
