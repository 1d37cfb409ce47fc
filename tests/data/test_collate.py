"""Collators: contract shapes, label masking, padding side, truncation that keeps every image token."""

from __future__ import annotations

import pytest
import torch

from m3d_lit.data.collate import ClipCollator, LMCollator, build_prompt

IMG = (8, 16, 16)
N = 6


def item(i: int, question: str, answer: str, mask: bool = False, shape=IMG) -> dict:
    return {
        "id": f"s{i}",
        "image": torch.rand(1, *shape),
        "question": question,
        "answer": answer,
        "kind": "seg" if mask else "open",
        "mask": torch.ones(1, *shape) if mask else None,
        "dataset": "cq500",
    }


@pytest.fixture
def items() -> list[dict]:
    return [
        item(0, "Is there an intracranial hemorrhage?", "Yes, there is a bleed on the left side."),
        item(1, "Is there a fracture?", "No."),
        item(2, "Can you segment the liver in this image?", "It is [SEG].", mask=True),
    ]


def test_build_prompt_puts_n_placeholders_before_the_question():
    assert build_prompt("Is there a bleed?", 3) == "<im_patch><im_patch><im_patch>Is there a bleed?"
    with pytest.raises(ValueError, match="num_visual_tokens"):
        build_prompt("q", 0)


def test_training_batch_has_contract_shapes_and_labels_only_on_answers(tiny_tokenizer, items):
    tok = tiny_tokenizer
    batch = LMCollator(tok, N, max_length=64, img_size=IMG)(items)
    b, width = batch["input_ids"].shape
    assert b == 3 and batch["images"].shape == (3, 1, *IMG) and batch["images"].dtype == torch.float32
    assert batch["attention_mask"].shape == batch["labels"].shape == (3, width)
    # masks only for the rows that segment, as bool; seg_rows names their rows
    assert batch["masks"].shape == (1, 1, *IMG) and batch["masks"].dtype == torch.bool
    assert batch["seg_flags"].tolist() == [False, False, True] and batch["seg_rows"].tolist() == [2]
    assert batch["masks"][0].all()
    # the LM head runs where the next token is labelled: flat b * L + t with labels[b, t + 1] trained
    flat = batch["labels"].flatten()
    assert (flat[batch["label_positions"] + 1] != -100).all()
    assert len(batch["label_positions"]) == int((batch["labels"] != -100).sum())
    assert batch["ids"] == ["s0", "s1", "s2"] and batch["kinds"] == ["open", "open", "seg"]
    im_id = tok.convert_tokens_to_ids("<im_patch>")
    for row, it in enumerate(items):
        ids, labels, attn = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert ids[0] == tok.bos_token_id and (ids[1 : 1 + N] == im_id).all()
        n = int(attn.sum())
        assert attn[:n].all() and not attn[n:].any()  # right padding
        answer = tok(it["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[labels != -100].tolist() == answer
        assert ids[n - len(answer) : n].tolist() == answer
        assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == -100).all()
    assert int(batch["attention_mask"].sum(1).max()) == width  # padded to the longest row, not to 64


def test_generation_batch_is_the_prompt_alone_left_padded(tiny_tokenizer, items):
    tok = tiny_tokenizer
    batch = LMCollator(tok, N, max_length=64, img_size=IMG, generation=True)(items)
    for row, it in enumerate(items):
        ids, attn = batch["input_ids"][row], batch["attention_mask"][row]
        n = int(attn.sum())
        assert attn[-n:].all() and not attn[:-n].any()
        question = tok(it["question"], add_special_tokens=False)["input_ids"]
        assert ids[-len(question) :].tolist() == question
        assert ids[-n:][:1].item() == tok.bos_token_id
    assert (batch["labels"] == -100).all()
    assert batch["answers"] == [it["answer"] for it in items]


def test_truncation_cuts_answer_end_then_question_end_never_image_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    q = "Is there an intracranial hemorrhage?"
    a = "Yes, there is a bleed on the left side."
    q_ids = tok(q, add_special_tokens=False)["input_ids"]
    a_ids = tok(a, add_special_tokens=False)["input_ids"]
    im_id = tok.convert_tokens_to_ids("<im_patch>")
    # room for the whole question and 3 answer tokens: the answer loses its end (and EOS)
    limit = 1 + N + len(q_ids) + 3
    batch = LMCollator(tok, N, max_length=limit, img_size=IMG)([item(0, q, a)])
    assert batch["input_ids"].shape[1] == limit
    assert (batch["input_ids"][0] == im_id).sum() == N
    assert batch["labels"][0][batch["labels"][0] != -100].tolist() == a_ids[:3]
    # room for 2 question tokens: no answer left, the question loses its end
    batch = LMCollator(tok, N, max_length=1 + N + 2, img_size=IMG)([item(0, q, a)])
    assert batch["input_ids"][0].tolist() == [tok.bos_token_id] + [im_id] * N + q_ids[:2]
    assert (batch["labels"] == -100).all()
    with pytest.raises(ValueError, match="no room"):
        LMCollator(tok, N, max_length=N + 1, img_size=IMG)


def test_wrong_image_size_and_missing_token_are_clear_errors(tiny_tokenizer):
    collate = LMCollator(tiny_tokenizer, N, max_length=64, img_size=IMG)
    with pytest.raises(
        ValueError, match=r"sample 's0' has shape \(1, 8, 16, 8\), img_size needs \(1, 8, 16, 16\)"
    ):
        collate([item(0, "q", "a", shape=(8, 16, 8))])
    with pytest.raises(ValueError, match=r"mask of sample"):
        bad = item(0, "q", "It is [SEG].", mask=True)
        bad["mask"] = torch.ones(1, 4, 16, 16)
        collate([bad])
    tiny_tokenizer.eos_token = None
    with pytest.raises(ValueError, match="EOS"):
        LMCollator(tiny_tokenizer, N, max_length=64, img_size=IMG)


def test_clip_collator_tokenises_answers_to_the_longest(tiny_tokenizer, items):
    batch = ClipCollator(tiny_tokenizer, max_length=5)(items)
    assert batch["images"].shape == (3, 1, *IMG)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 5)
    short = ClipCollator(tiny_tokenizer, max_length=64)(items[1:2])
    assert short["input_ids"].shape[1] == len(tiny_tokenizer("No.")["input_ids"])


def test_masks_travel_only_for_rows_that_still_segment(tiny_tokenizer):
    rows = [
        item(0, "Can you segment the liver in this image?", "It is [SEG].", mask=True),
        item(1, "Is there a fracture?", "No.", mask=True),  # a mask, but no [SEG] to train it
        item(2, "Can you segment the liver in this image?", "It is [SEG].", mask=True),
    ]
    question = len(tiny_tokenizer(rows[2]["question"], add_special_tokens=False)["input_ids"])
    # room for the prompts and two answer tokens: the [SEG] of rows 0 and 2 (their third) is cut off
    cut = LMCollator(tiny_tokenizer, N, max_length=1 + N + question + 2, img_size=IMG)(rows)
    assert cut["seg_flags"].tolist() == [True, False, True] and cut["seg_rows"].tolist() == []
    assert cut["masks"].shape == (0, 1, *IMG)
    whole = LMCollator(tiny_tokenizer, N, max_length=64, img_size=IMG)(rows)
    assert whole["seg_rows"].tolist() == [0, 2] and whole["masks"].shape == (2, 1, *IMG)
    # generation: the prompts hold no [SEG]; the rows whose answer segments carry their reference mask
    prompts = LMCollator(tiny_tokenizer, N, max_length=64, img_size=IMG, generation=True)(rows)
    assert prompts["seg_rows"].tolist() == [0, 2] and len(prompts["label_positions"]) == 0


def test_volumes_keep_their_stored_dtype_and_a_mixed_batch_the_wider_one(tiny_tokenizer, items):
    collate = LMCollator(tiny_tokenizer, N, max_length=64, img_size=IMG)
    half = [{**it, "image": it["image"].half()} for it in items]
    assert collate(half)["images"].dtype == torch.float16
    mixed = collate([half[0], items[1]])
    assert mixed["images"].dtype == torch.float32 and torch.equal(
        mixed["images"][0], half[0]["image"].float()
    )
