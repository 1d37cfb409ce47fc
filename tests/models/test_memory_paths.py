"""The memory-saving paths compute what the plain ones compute, and keep fewer bytes for backward.

The ViT blocks (norm fused with the next projection, GELU recomputed), LoRA's down projection with its
dropout recomputed, and the LM loss on labelled rows in chunks are each compared with the plain
computation. Float64 comparisons allow a few units in the last place (the products are the same, summed
in another order); under bf16 autocast the same bf16 products are made, so bf16's own resolution
(2^-8 relative) bounds the difference.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from m3d_lit.models import lm_loss, vision
from m3d_lit.models.config import LoraConfig
from m3d_lit.models.llm import DropoutLinear, apply_lora, build_causal_lm


def _saved_bytes(run, module: torch.nn.Module) -> tuple[torch.Tensor, int]:
    """`run()`'s output and the bytes of the distinct storages autograd keeps for its backward, the
    module's weights (and views of them) left out."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


def _block_run(block: torch.nn.Module, x: torch.Tensor, plain: bool, autocast: bool):
    block, x = copy.deepcopy(block), x.clone().requires_grad_()
    recompute = (lambda *t: False) if plain else vision._recomputes
    with mock.patch.object(vision, "_recomputes", recompute):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, saved = _saved_bytes(lambda: block(x), block)
    y.float().square().sum().backward()
    return y, x.grad, {n: p.grad for n, p in block.named_parameters()}, saved


@pytest.mark.parametrize("autocast", [False, True])
def test_vit_block_recomputing_its_cheap_parts_gives_the_plain_gradients(autocast: bool) -> None:
    torch.manual_seed(0)
    block = vision.TransformerBlock(64, 256, 4, 0.0, qkv_bias=False)
    x = torch.randn(2, 33, 64)
    if not autocast:
        block, x = block.double(), x.double()
    lean, plain = _block_run(block, x, False, autocast), _block_run(block, x, True, autocast)
    tol = {"rtol": 2**-8, "atol": 1e-2} if autocast else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(lean[0], plain[0], **tol)
    torch.testing.assert_close(lean[1], plain[1], **tol)
    for name, grad in plain[2].items():
        torch.testing.assert_close(lean[2][name], grad, **tol, msg=name)
    # the GELU output (2 x 33 x 256) and the normalised copies are no longer kept
    assert lean[3] <= plain[3] - 2 * 33 * 256 * x.element_size() * (0.5 if autocast else 1)


def _lora_model(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    llm = build_causal_lm(
        config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
    ).double()
    return apply_lora(llm, LoraConfig(r=4, alpha=8, dropout=dropout)).train()


def test_lora_down_projection_keeps_peft_names_and_draws_peft_dropout() -> None:
    model = _lora_model(0.3)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_A["default"], DropoutLinear) and layer.lora_A["default"].p == 0.3
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in model.state_dict()
    with torch.no_grad():  # lora_B starts at zero: give the adapter something to say
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    ours, saved = _saved_bytes(lambda: layer(x), layer)
    ours.square().sum().backward()
    grads = (x.grad.clone(), layer.lora_A["default"].weight.grad.clone())
    x.grad, layer.lora_A["default"].weight.grad = None, None
    # peft's own computation with the same draw: B(A(dropout(x))) * scaling on top of the frozen layer
    torch.manual_seed(5)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    plain = layer.base_layer(x) + F.linear(F.linear(F.dropout(x, 0.3), a), b) * layer.scaling["default"]
    plain.square().sum().backward()
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], layer.lora_A["default"].weight.grad, rtol=1e-12, atol=1e-12)
    # kept for backward: x itself and the rank-4 output of A, not the dropout's mask and output
    assert saved == x.numel() * 8 + 3 * 5 * 4 * 8


def test_chunked_lm_loss_equals_the_full_logit_loss_with_its_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).double()
    hidden = torch.randn(3, 9, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9), generator=gen)
    labels[torch.rand(3, 9, generator=gen) < 0.5] = -100
    positions = lm_loss.label_positions(labels)
    full = lm_loss.full_lm_loss(head(hidden), labels)
    full_grads = torch.autograd.grad(full, (hidden, head.weight))
    for chunk in (1, 4, 256):  # several chunks, and one
        loss, predicted, targets = lm_loss.chunked_lm_loss(head, hidden, labels, positions, chunk_rows=chunk)
        grads = torch.autograd.grad(loss, (hidden, head.weight))
        torch.testing.assert_close(loss, full, rtol=1e-13, atol=0)
        for ours, theirs in zip(grads, full_grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
        shown = labels[:, 1:] != -100
        assert torch.equal(predicted, head(hidden)[:, :-1].argmax(-1)[shown])
        assert torch.equal(targets, labels[:, 1:][shown])
    none = torch.full_like(labels, -100)
    loss, predicted, _ = lm_loss.chunked_lm_loss(head, hidden, none, lm_loss.label_positions(none))
    assert float(loss.detach()) == 0.0 and predicted.numel() == 0
    loss.backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) == 0.0
