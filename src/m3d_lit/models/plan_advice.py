"""What would make a plan that does not fit fit (`m3d-lit plan`): the fewest settings to change.

Only settings that keep what is trained are tried: recomputing more activations (`checkpointing all`),
sharding the optimizer state over the GPUs (`zero` 1, then 2), holding the frozen weights in bf16 and
training only the new embedding rows. Each candidate is planned as the plan itself is (the measured
activations are reused), fewest changes first, and within as many changes the least communication.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from m3d_lit.models.plan import PlanSettings, plan

__all__ = ["fit_advice"]


def _choices(settings: PlanSettings) -> dict[str, list[Any]]:
    """Per setting, its current value first, then the values that save memory."""
    choices: dict[str, list[Any]] = {
        "checkpointing": [settings.checkpointing] + (["all"] if settings.checkpointing != "all" else []),
        "zero": [settings.zero] + ([z for z in (1, 2) if z > settings.zero] if settings.gpus > 1 else []),
        "frozen_dtype": [settings.frozen_dtype] + (["bf16"] if settings.frozen_dtype != "bf16" else []),
        "full_embeddings": [settings.full_embeddings] + ([False] if settings.full_embeddings else []),
    }
    return choices


def _candidates(settings: PlanSettings) -> list[dict[str, Any]]:
    """Every combination of changes, fewest first, then the lowest ZeRO stage."""
    choices = _choices(settings)
    combos = []
    for values in itertools.product(*choices.values()):
        changes = {name: value for name, value in zip(choices, values) if value != getattr(settings, name)}
        if changes:
            combos.append(changes)
    return sorted(combos, key=lambda c: (len(c), c.get("zero", settings.zero), "checkpointing" in c))


def _at_one(result: dict[str, Any]) -> float:
    """GiB of a plan's settings at micro-batch 1."""
    return result["total_gib"] - result["per_sample_gib"] * (result["settings"]["micro_batch"] - 1)


def fit_advice(settings: PlanSettings, result: dict[str, Any]) -> dict[str, Any] | None:
    """For a `plan` result that does not fit: the changes that fit its micro-batch, else micro-batch 1.

    Returns None when it fits, else a dict: `needs_gib` (GiB at micro-batch 1 as set), `changes` (the
    settings to change; None when none is enough) and `micro_batch` (the one they fit), with `total_gib`
    and `max_micro_batch` under the changes; where no change fits and not even micro-batch 1 fits as set,
    `best_gib` (micro-batch 1 with every change), `best_settings` (those settings) and `frozen_gib` (the
    frozen weights' share of it).
    """
    if result["fits"]:
        return None
    advice: dict[str, Any] = {"needs_gib": _at_one(result), "changes": None}
    candidates = _candidates(settings)
    # the micro-batch asked for; where not even 1 fits as set, then 1 (what any run needs)
    targets = [settings.micro_batch] + (
        [1] if settings.micro_batch > 1 and not result["max_micro_batch"] else []
    )
    for target, changes in itertools.product(targets, candidates):
        tried = plan(replace(settings, micro_batch=target, **changes))
        if tried["fits"]:
            return {**advice, "changes": changes, "micro_batch": target, "total_gib": tried["total_gib"],
                    "max_micro_batch": tried["max_micro_batch"]}  # fmt: skip
    if result["max_micro_batch"]:
        return {**advice, "micro_batch": result["max_micro_batch"]}  # fits as set at a smaller micro-batch
    best = plan(replace(settings, micro_batch=1, **(candidates[-1] if candidates else {})))
    saving = {name: best["settings"][name] for name in _choices(settings)}
    advice.update(best_gib=best["total_gib"], frozen_gib=best["memory_gib"]["frozen_weights"], micro_batch=1,
                  best_settings=saving)  # fmt: skip
    return advice
