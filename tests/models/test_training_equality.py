"""Nothing the memory and speed work changes may change what is learned.

Three stage-3 optimizer steps of the small test model in float64, with LoRA dropout, a `[SEG]` row, a
blanked volume and rows of different lengths, give the losses, gradients and weights that the code before
issue 32 gave. `TODAY` holds those values, recorded by running this same function on main's code
(commit da0b387) before any of the changes. The model's weights are drawn per name from seeded
generators, so the values do not depend on the order in which the model is constructed.

Tolerance: float64 carries 16 significant digits; the changed code adds the same terms in another order
(chunked cross-entropy, rows gathered before the LM head), which moves a result by a few units in the
16th digit, and three AdamW steps amplify that at most by the ratio of an update to its gradient's
noise. A relative 1e-9 leaves six orders of magnitude for that, while a wrong token position, a lost
row or a changed dropout draw moves these values in the 2nd to 4th digit.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import LAMED
from equality_steps import batch_items, draw_weights, forward_batch, seeded_generator

from m3d_lit.data.collate import make_collator
from m3d_lit.models.build import build_lamed
from m3d_lit.models.presets import STAGE_TRAINABLE

PARTS = ("vision", "perceiver", "llm", "new_tokens", "segmentation", "seg_head")
TERMS = ("loss", "lm_loss", "dice", "bce")


def _projection(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per part, the sum over its trainable tensors of <tensor, a fixed random direction>: signed, so a
    wrong sign or a lost term shows, and compact enough to record."""
    out = dict.fromkeys(PARTS, 0.0)
    for name, value in tensors.items():
        direction = torch.randn(value.shape, generator=seeded_generator("dir:" + name), dtype=torch.float64)
        out[name.split(".")[0]] += float((value.double() * direction).sum())
    return out


def run_steps(checkpointing: str = "none") -> dict[str, list]:
    """Three AdamW steps from the drawn weights; the loss terms and gradient projections of each step
    and the weights' projection after the last."""
    model = build_lamed("tiny", LAMED)
    model.set_trainable(STAGE_TRAINABLE[3])
    if checkpointing != "none":
        model.enable_gradient_checkpointing(
            llm=checkpointing in ("llm", "all"), vision=checkpointing == "all"
        )
    model = model.double().train()
    draw_weights(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.01)
    collate = make_collator(model)
    torch.manual_seed(1)  # LoRA dropout draws
    record: dict[str, list] = {"terms": [], "grads": []}
    for items in batch_items(model):
        batch = collate(items)
        optimizer.zero_grad(set_to_none=True)
        out = forward_batch(model, batch)
        out["loss"].backward()
        record["terms"].append([float(out[k].detach()) for k in TERMS])
        grads = {n: p.grad for n, p in trainable.items() if p.grad is not None}
        record["grads"].append(_projection(model, grads))
        optimizer.step()
    record["weights"] = [_projection(model, {n: p.detach() for n, p in trainable.items()})]
    return record


TODAY: dict[str, list] = {
    "terms": [  # loss, lm_loss, dice, bce per step
        [8.609949702289999, 7.231892503860408, 0.5958485432918259, 0.7822086551377647],
        [8.858007391539651, 7.460711918660361, 0.6214282993509971, 0.7758671735282927],
        [8.365632312193632, 7.047451178720516, 0.610296417193345, 0.7078847162797705],
    ],
    "grads": [
        {
            "vision": -1.8008126289069724,
            "perceiver": 2.7773092663737664,
            "llm": -6.356022835458888,
            "new_tokens": 0.45820192240669466,
            "segmentation": 1.0502113583582977,
            "seg_head": 0.3257418475697992,
        },
        {
            "vision": -1.0139813405066518,
            "perceiver": -2.8794129149547976,
            "llm": -4.558223880216152,
            "new_tokens": 0.6836572706486868,
            "segmentation": 0.4242881756982162,
            "seg_head": 0.2745435768247128,
        },
        {
            "vision": 2.2780093224876192,
            "perceiver": -1.0324393552104631,
            "llm": 17.20732148182698,
            "new_tokens": 0.053357176576366044,
            "segmentation": 0.03031704538009429,
            "seg_head": -0.2159769914690866,
        },
    ],
    "weights": [
        {
            "vision": -16.990054664609016,
            "perceiver": -3.102549830657146,
            "llm": -17.38588535811282,
            "new_tokens": 0.37625669458491373,
            "segmentation": 99.62580200551868,
            "seg_head": -8.188456324362985,
        },
    ],
}


def _close(ours: Any, theirs: Any, where: str) -> None:
    if isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in theirs:
            _close(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _close(a, b, f"{where}[{i}]")
    else:
        assert math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=1e-15), f"{where}: {ours!r} != {theirs!r}"


@pytest.mark.parametrize("checkpointing", ["none", "all"])
def test_three_float64_stage3_steps_learn_what_they_learned_before(checkpointing: str) -> None:
    _close(run_steps(checkpointing), TODAY, "stage3")
