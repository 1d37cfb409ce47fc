"""The composite model on the tiny preset: splice, losses, gradients, trainability, generation."""

from __future__ import annotations

import copy

import pytest
import torch

from m3d_lit.models.build import build_lamed
from m3d_lit.models.lamed import LamedModel
from m3d_lit.models.llm import unwrap
from m3d_lit.models.presets import STAGE_TRAINABLE
from m3d_lit.tokens import IM_PATCH


def make_batch(model: LamedModel, pairs: list[tuple[str, str]], side: str = "right", seed: int = 0) -> dict:
    """Prompt = placeholders + question, target = answer + eos; labels -100 off the answer."""
    tok = model.tokenizer
    prompts = [tok(IM_PATCH * model.num_visual_tokens + q)["input_ids"] for q, _ in pairs]
    answers = [
        tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if a else [] for _, a in pairs
    ]
    length = max(len(p) + len(a) for p, a in zip(prompts, answers))
    b = len(pairs)
    batch = {
        "input_ids": torch.full((b, length), tok.pad_token_id),
        "attention_mask": torch.zeros(b, length, dtype=torch.long),
        "labels": torch.full((b, length), -100),
    }
    for i, (p, a) in enumerate(zip(prompts, answers)):
        n = len(p) + len(a)
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        batch["input_ids"][i, cols] = torch.tensor(p + a)
        batch["attention_mask"][i, cols] = 1
        batch["labels"][i, cols] = torch.tensor([-100] * len(p) + a)
    gen = torch.Generator().manual_seed(seed)
    batch["images"] = torch.rand(b, 1, *model.img_size, generator=gen)
    batch["masks"] = (torch.rand(b, 1, *model.img_size, generator=gen) > 0.8).float()
    batch["seg_flags"] = torch.tensor(["[SEG]" in a for _, a in pairs])
    return batch


PAIRS = [("Segment the hemorrhage.", "It is [SEG]."), ("Is there a calvarial fracture?", "No.")]


@pytest.fixture(scope="module")
def model() -> LamedModel:
    torch.manual_seed(0)
    return build_lamed("tiny").eval()


def stage3(seed: int = 0) -> LamedModel:
    torch.manual_seed(seed)
    model = build_lamed("tiny")
    model.set_trainable(STAGE_TRAINABLE[3])
    return model.train()


def test_forward_shapes_and_losses(model: LamedModel) -> None:
    batch = make_batch(model, PAIRS)
    out = model(**batch, full_logits=True)
    b, length = batch["input_ids"].shape
    assert out["logits"].shape == (b, length, len(model.tokenizer))
    # without full_logits the head runs on the labelled positions only, to the same loss
    lean = model(**batch)
    assert "logits" not in lean and lean["predicted"].shape == lean["targets"].shape == (
        int((batch["labels"] != -100).sum()),
    )
    torch.testing.assert_close(lean["lm_loss"], out["lm_loss"])
    assert out["seg_logits"].shape == (1, 1, *model.img_size)
    assert out["seg_rows"].tolist() == [0]
    for key in ("loss", "lm_loss", "dice", "bce"):
        assert out[key].dim() == 0 and torch.isfinite(out[key])
    torch.testing.assert_close(out["loss"], out["lm_loss"] + out["dice"] + out["bce"])
    assert model.num_visual_tokens == 32 and model.img_size == (32, 64, 64) and model.max_length == 256


def test_splice_puts_visual_tokens_at_placeholders_left_and_right(model: LamedModel) -> None:
    right, left = make_batch(model, PAIRS, "right"), make_batch(model, PAIRS, "left")
    with torch.no_grad():
        visual = model.perceiver(model.vision(right["images"])[0])
        for batch in (right, left):
            embeds = model.embed(batch["images"], batch["input_ids"])
            for row in range(2):
                where = (batch["input_ids"][row] == model.im_patch_id).nonzero().flatten()
                torch.testing.assert_close(embeds[row, where], visual[row])
        # float64: the two paddings add the same terms in another order, a difference of ~1e-15 on
        # logits of order 10, where a token placed or masked wrongly moves them by O(1)
        wide = copy.deepcopy(model).double()
        out_r, out_l = (
            wide(**{**b, "images": b["images"].double()}, full_logits=True)["logits"] for b in (right, left)
        )
    for row in range(2):
        real_r = out_r[row][right["attention_mask"][row].bool()]
        real_l = out_l[row][left["attention_mask"][row].bool()]
        torch.testing.assert_close(real_r, real_l, atol=1e-9, rtol=0)


def test_placeholder_count_mismatch_names_the_row(model: LamedModel) -> None:
    batch = make_batch(model, PAIRS)
    row = batch["input_ids"][1]
    row[(row == model.im_patch_id).nonzero()[0]] = model.tokenizer.pad_token_id
    with pytest.raises(ValueError, match=r"row 1 has 31 <im_patch> placeholders but the perceiver gives 32"):
        model(**batch)


def test_seg_batch_sends_gradient_everywhere_it_should() -> None:
    model = stage3()
    model(**make_batch(model, PAIRS))["loss"].backward()

    def grad_norm(params) -> float:
        return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)

    named = dict(model.named_parameters())
    assert grad_norm(model.segmentation.parameters()) > 0
    assert grad_norm(model.seg_head.parameters()) > 0
    assert grad_norm(model.vision.parameters()) > 0
    assert grad_norm([p for n, p in named.items() if "lora_B" in n]) > 0
    assert grad_norm(model.new_tokens.parameters()) > 0


def test_batch_without_seg_still_touches_every_trainable_parameter() -> None:
    model = stage3()
    out = model(**make_batch(model, [("Is there a fracture?", "No."), ("Is there mass effect?", "Yes.")]))
    assert out["seg_logits"] is None and out["dice"].item() == 0.0
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(float(p.grad.abs().sum()) == 0 for p in model.segmentation.parameters())


def lora_count(config: dict) -> int:
    h, inter, r = config["llm"]["hidden_size"], config["llm"]["intermediate_size"], config["lora"]["r"]
    per_layer = 4 * r * (h + h) + 3 * r * (h + inter)  # q k v o, gate up down
    return per_layer * config["llm"]["num_hidden_layers"]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_trainable_parameter_counts_per_stage() -> None:
    model = build_lamed("tiny")
    model.set_trainable(STAGE_TRAINABLE[2])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count(model.perceiver) + count(model.new_tokens)
    model.set_trainable(STAGE_TRAINABLE[3])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = (
        count(model.vision) + count(model.perceiver) + count(model.segmentation) + count(model.seg_head)
    )
    assert trainable == expected + count(model.new_tokens) + lora_count(model.config)
    base = unwrap(model.llm)
    assert not base.get_input_embeddings().weight.requires_grad
    assert not base.get_output_embeddings().weight.requires_grad
    assert count(model.new_tokens) == 2 * 4 * model.config["llm"]["hidden_size"]
    with pytest.raises(ValueError, match="cannot become fully trainable"):
        model.set_trainable({"llm": "full"})
    with pytest.raises(ValueError, match=r"trainable: \['vision'\] = 'lora' is not valid"):
        model.set_trainable({"vision": "lora"})


def test_new_rows_start_as_the_mean_of_the_old_rows(model: LamedModel) -> None:
    weight = unwrap(model.llm).get_input_embeddings().weight
    old = torch.ones(weight.shape[0], dtype=torch.bool)
    old[model.new_tokens.token_ids] = False
    mean = weight[old].mean(0)
    for row in model.new_tokens.input_rows:
        torch.testing.assert_close(row, mean)


def test_gradient_checkpointing_keeps_loss_and_gradients() -> None:
    model = stage3().double()
    model.eval()  # no LoRA dropout, so both passes compute the same function
    batch = make_batch(model, PAIRS)
    batch["images"] = batch["images"].double()
    model(**batch)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_gradient_checkpointing(llm=True, vision=True)
    model(**batch)["loss"].backward()
    for name, grad in grads.items():
        # float64: recomputation may only reorder sums, ~1e-16 relative; gradients are below 100
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-10, rtol=1e-9)


QUESTIONS = [
    "Is there a fracture?",
    "Which side is the bleed on? Please answer briefly.",
    "Segment the hemorrhage.",
]


def test_batched_greedy_generate_equals_one_by_one(model: LamedModel) -> None:
    # float64: padding changes only the order of sums (~1e-15), far below any fp32-sized near-tie of two
    # logits that could make greedy decoding pick another token on one CPU and not on another
    model = copy.deepcopy(model).double()
    batch = make_batch(model, [(q, "") for q in QUESTIONS], side="left", seed=3)
    batch["images"] = batch["images"].double()
    args = {"max_new_tokens": 6}
    together = model.generate(batch["images"], batch["input_ids"], batch["attention_mask"], **args)
    for row in range(len(QUESTIONS)):
        keep = batch["attention_mask"][row].bool()
        ids, mask = batch["input_ids"][row, keep][None], batch["attention_mask"][row, keep][None]
        alone = model.generate(batch["images"][row : row + 1], ids, mask, **args)
        assert alone["texts"] == [together["texts"][row]]
    assert len(together["seg_logits"]) == len(QUESTIONS)


def test_generate_stops_each_row_at_eos_and_segments_on_seg(monkeypatch) -> None:
    model = build_lamed("tiny").eval()
    tok = model.tokenizer
    batch = make_batch(model, [(q, "") for q in QUESTIONS[:2]], side="left")
    # Scripted next tokens: row 0 says "[SEG]" then eos; row 1 says "Yes" five times.
    script = {
        0: [model.seg_id, tok.eos_token_id],
        1: tok("Yes Yes Yes Yes Yes", add_special_tokens=False)["input_ids"],
    }
    calls = {"n": 0, "rows": []}
    alive = [0, 1]  # the batch rows still decoding, in order

    def scripted_logits(hidden: torch.Tensor) -> torch.Tensor:
        step = calls["n"]
        calls["n"] += 1
        calls["rows"].append(hidden.shape[0])
        assert hidden.shape[0] == len(alive)  # a row that has finished has left the batch
        logits = torch.zeros(hidden.shape[0], len(tok))
        for i, row in enumerate(list(alive)):
            token = script[row][step] if step < len(script[row]) else tok.eos_token_id
            logits[i, token] = 1.0
            if token == tok.eos_token_id:
                alive.remove(row)
        return logits

    steps: list[torch.Tensor] = []
    monkeypatch.setattr(model, "logits", scripted_logits)
    out = model.generate(batch["images"], batch["input_ids"], batch["attention_mask"], max_new_tokens=20,
                         on_step=lambda logits, ids: steps.append(ids.clone()))  # fmt: skip
    assert out["texts"] == ["[SEG]", "Yes Yes Yes Yes Yes"]
    assert calls["n"] == 6  # stopped when the last row reached eos, not after 20 steps
    assert calls["rows"] == [2, 2, 1, 1, 1, 1]  # row 0 stopped at step 2 and cost nothing after it
    assert [int(ids[0]) for ids in steps] == [model.seg_id, tok.eos_token_id] + [tok.pad_token_id] * 4
    assert out["seg_logits"][0].shape == (1, *model.img_size) and out["seg_logits"][1] is None


def test_generate_refuses_right_padding(model: LamedModel) -> None:
    batch = make_batch(model, [(q, "") for q in QUESTIONS[:2]], side="right")
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(batch["images"], batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_random_llm_head_leaves_room_for_confident_answers(preset: str) -> None:
    """Under LoRA the random LM head stays frozen; its rows must be long enough for a confident logit."""
    from m3d_lit.models.presets import resolve

    config = resolve(preset)["llm"]
    row_norm = config["initializer_range"] * config["hidden_size"] ** 0.5
    # the final RMSNorm gives hidden states of norm sqrt(H); the best logit is row_norm * sqrt(H)
    assert row_norm * config["hidden_size"] ** 0.5 > 15.0


def test_lora_stage_learns_an_answer_that_depends_on_the_scan() -> None:
    """Stage-3 trainability (LoRA; LM head frozen): two scans, one question, opposite answers."""
    model = stage3()
    question = "Is there a calvarial fracture?"
    batch = make_batch(model, [(question, "Yes."), (question, "No.")])
    batch["images"][0] = 0.0
    del batch["masks"], batch["seg_flags"]  # no mask: the loss is the LM loss alone
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for _ in range(40):
        optimizer.zero_grad()
        loss = model(**batch)["lm_loss"]
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = model(**batch)["lm_loss"].item()
    # the old random head (init std 0.02) could not go below ~1.7 nats per answer token
    assert final < 0.3, final


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [({"loss": {"dice_smooth": "denominatr"}}, "dice_smooth"), ({"seg_prompt": "maen"}, "seg_prompt")],
)
def test_misspelt_computation_choice_is_refused(overrides: dict, problem: str) -> None:
    """`dice_smooth: denominatr` used to train with the denominator-only Dice without a word."""
    with pytest.raises(ValueError, match=problem):
        build_lamed("tiny", overrides)
