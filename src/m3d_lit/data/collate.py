"""Collators: lists of Dataset items -> the batches the tasks consume.

Only the model knows the tokenizer, the visual token count and the volume size, so every collator is
built from it by ``make_collator(model)``: training (the task hands it to the DataModule with
``BaseDataModule.set_collator`` in its ``setup()``), example logging, ``eval``, ``ask``, the bench and the app.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from m3d_lit.data.sample import Sample

__all__ = [
    "IMAGE_TOKEN",
    "SEG_TOKEN",
    "build_prompt",
    "ClipCollator",
    "LMCollator",
    "make_collator",
    "row_masks",
]

IMAGE_TOKEN = "<im_patch>"
SEG_TOKEN = "[SEG]"
IGNORE_INDEX = -100


def build_prompt(question: str, num_visual_tokens: int) -> str:
    """The one prompt format: ``<im_patch>`` x N, then the question (training, eval and ``ask`` share it).

    Args:
        question: the question text.
        num_visual_tokens: how many image placeholders (the perceiver's output length).
    """
    if num_visual_tokens < 1:
        raise ValueError(f"num_visual_tokens must be >= 1, got {num_visual_tokens}")
    return IMAGE_TOKEN * num_visual_tokens + question


def _stack_images(items: Sequence[Sample], img_size: tuple[int, ...] | None) -> torch.Tensor:
    expected = None if img_size is None else (1, *img_size)
    first = tuple(items[0]["image"].shape)
    for item in items:
        shape = tuple(item["image"].shape)
        if shape != (expected or first):
            want = "img_size" if expected else "the batch's first image"
            raise ValueError(
                f"image of sample {item['id']!r} has shape {shape}, {want} needs {expected or first}"
            )
    # volumes travel in the dtype they were stored in (a float16 cache stays float16: half the bytes
    # through worker queues and onto the device); the model widens them on the device
    dtype = functools.reduce(torch.promote_types, (item["image"].dtype for item in items))
    return torch.stack([item["image"].to(dtype) for item in items])


def _text_lists(items: Sequence[Sample]) -> dict[str, list[str]]:
    keys = {"ids": "id", "questions": "question", "answers": "answer", "kinds": "kind", "datasets": "dataset"}
    return {out: [item[key] for item in items] for out, key in keys.items()}


class ClipCollator:
    """Image-report pairs for stage 1: the text is each item's ``answer``.

    Args:
        tokenizer: a Hugging Face tokenizer with a pad token.
        max_length: longest text in tokens; longer texts lose their end.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; ClipCollator pads texts to the longest")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: Sequence[Sample]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of samples")
        texts = self.tokenizer(
            [item["answer"] for item in items],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "images": _stack_images(items, None),
            "input_ids": texts["input_ids"],
            "attention_mask": texts["attention_mask"],
            **_text_lists(items),
        }


class LMCollator:
    """Prompt + answer rows for stages 2 and 3, or prompts alone for generation.

    A row is ``[BOS]`` (when the tokenizer has one) + ``<im_patch>`` x N + question + answer + EOS.
    ``labels`` hold the answer and EOS; everything else is -100. Rows are padded to the longest row of
    the batch (right for training, left with ``generation=True``). Found here on the host, so that the
    model never waits for the device to learn a shape: ``label_positions`` (flat ``b * L + t`` of the
    positions whose next token is labelled, where the LM head runs) and ``seg_rows`` (the rows that
    segment: a mask and a ``[SEG]`` in the answer that survived truncation; with ``generation=True`` the
    rows whose answer segments). ``masks`` holds one bool mask per row of ``seg_rows`` and none for the
    other rows; ``seg_flags`` (B) marks the rows with a mask and a ``[SEG]`` in the answer. Images keep
    their stored dtype (float16 or float32); the model widens them on the device.

    Truncation: ``max_length`` counts the image tokens, which are never cut. A row that is too long loses
    the END of its answer first (the EOS goes with it); only when no answer is left does the question
    lose its end too.

    Args:
        tokenizer: a Hugging Face tokenizer with ``<im_patch>`` as an added token, a pad and an EOS token.
        num_visual_tokens: image placeholders per row (from the model config).
        max_length: longest row in tokens, image tokens included.
        img_size: expected volume size (D, H, W); every image must be 1 x D x H x W.
        generation: build prompts alone, left padded, for batched generation.
    """

    def __init__(
        self,
        tokenizer: Any,
        num_visual_tokens: int,
        max_length: int,
        img_size: Sequence[int],
        generation: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_visual_tokens = num_visual_tokens
        self.max_length = max_length
        self.img_size = tuple(int(s) for s in img_size)
        self.generation = generation
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an EOS token")
        self.prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        fixed = len(self.prefix) + num_visual_tokens
        if max_length <= fixed:
            raise ValueError(
                f"max_length {max_length} leaves no room for text after {num_visual_tokens} image tokens"
                f" (+{len(self.prefix)} BOS)"
            )
        if len(self.img_size) != 3:
            raise ValueError(f"img_size must be (D, H, W), got {self.img_size}")

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token: add it as a special token first")
        return token_id

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """(image ids, question ids), tokenised from ``build_prompt`` so this format is the only one."""
        ids = self._encode(build_prompt(question, self.num_visual_tokens))
        n = self.num_visual_tokens
        if ids[:n] != [self.image_token_id] * n or self.image_token_id in ids[n:]:
            raise ValueError(f"the tokenizer does not keep {n} {IMAGE_TOKEN} tokens intact in the prompt")
        return ids[:n], ids[n:]

    def _row(self, item: Sample) -> tuple[list[int], list[int]]:
        """Token ids and labels of one sample, truncated as the class docstring says."""
        images, question = self._prompt_ids(item["question"])
        answer = [] if self.generation else self._encode(item["answer"]) + [self.tokenizer.eos_token_id]
        room = self.max_length - len(self.prefix) - len(images)
        answer = answer[: max(room - len(question), 0)]
        question = question[:room]
        prompt = self.prefix + images + question
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    def _masks(self, items: Sequence[Sample], token_rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """`seg_flags` (B: a mask and a `[SEG]` in the answer), `seg_rows` (the rows that segment) and
        `masks` (bool, one per row of `seg_rows`, none for the other rows)."""
        flags = [False] * len(items)
        for i, item in enumerate(items):
            if item.get("mask") is None:
                continue
            if tuple(item["mask"].shape) != (1, *self.img_size):
                raise ValueError(
                    f"mask of sample {item['id']!r} has shape {tuple(item['mask'].shape)},"
                    f" img_size needs {(1, *self.img_size)}"
                )
            # a mask only trains the segmentation head where the answer emits [SEG]
            flags[i] = SEG_TOKEN in item["answer"]
        rows = [i for i, flag in enumerate(flags) if flag]
        if rows and not self.generation:  # ... and where that [SEG] survived truncation
            seg_id = self._token_id(SEG_TOKEN)
            rows = [i for i in rows if seg_id in token_rows[i]]
        masks = [items[i]["mask"] > 0.5 for i in rows]
        return {
            "masks": torch.stack(masks) if masks else torch.zeros(0, 1, *self.img_size, dtype=torch.bool),
            "seg_flags": torch.tensor(flags, dtype=torch.bool),
            "seg_rows": torch.tensor(rows, dtype=torch.long),
        }

    def __call__(self, items: Sequence[Sample]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of samples")
        rows = [self._row(item) for item in items]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            span = slice(width - len(ids), width) if self.generation else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            attention[i, span] = 1
            labels[i, span] = torch.tensor(lab)
        # where the LM head must run (flat b * L + t whose next token is labelled), found here on the
        # host so the forward never waits for the device to count them
        trained = torch.zeros_like(labels, dtype=torch.bool)
        trained[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        return {
            "images": _stack_images(items, self.img_size),
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "label_positions": trained.flatten().nonzero().flatten(),
            **self._masks(items, [ids for ids, _ in rows]),
            **_text_lists(items),
        }


def make_collator(
    model: Any, generation: bool = False, max_length: int | None = None
) -> ClipCollator | LMCollator:
    """The collator of `model`, the one way every caller builds it.

    Args:
        model: a `LamedModel` (its `tokenizer`, `num_visual_tokens`, `max_length`, `img_size` give an
            `LMCollator`) or a `ClipModel` (its `text_tokenizer` and `max_length` give a `ClipCollator`).
        generation: prompts alone, left padded, for generation (`LMCollator` only).
        max_length: the token limit instead of the model's (stage 1's `text_max_length`).
    """
    if hasattr(model, "text_tokenizer"):
        if generation:
            raise ValueError("a CLIP model generates no text: its collator has no generation mode")
        return ClipCollator(model.text_tokenizer, max_length or model.max_length)
    return LMCollator(
        model.tokenizer,
        model.num_visual_tokens,
        max_length or model.max_length,
        tuple(model.img_size),
        generation=generation,
    )


def row_masks(batch: dict[str, Any], rows: int | None = None) -> list[torch.Tensor | None]:
    """The mask of each of the first `rows` batch rows (all by default), None for a row without one: an
    `LMCollator` batch carries masks only for the rows of `seg_rows`."""
    count = len(batch["input_ids"]) if rows is None else rows
    out: list[torch.Tensor | None] = [None] * count
    for j, row in enumerate(batch.get("seg_rows", torch.zeros(0, dtype=torch.long)).tolist()):
        if row < count:
            out[row] = batch["masks"][j]
    return out
