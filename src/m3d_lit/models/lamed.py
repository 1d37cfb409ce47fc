"""The composite M3D-LaMed model: vision -> perceiver -> LLM (image tokens spliced in) -> [SEG] -> masks.

Plain `nn.Module`; the Lightning tasks own the optimisation. Trainability is configuration
(`set_trainable`), never substring lists. Vision parameters are named `vision.*` as in `ClipModel`, so
stage 1 weights move into stage 2 by prefix.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from m3d_lit.errors import InputError
from m3d_lit.losses import at_least_fp32
from m3d_lit.losses.segmentation import bce_loss, dice_loss
from m3d_lit.models import blocks, lm_loss, registry
from m3d_lit.models.config import LoraConfig, ModelConfig
from m3d_lit.models.llm import NewTokenRows, apply_lora, sample_next, unwrap
from m3d_lit.models.registry import build_perceiver
from m3d_lit.models.tokenizer import build_llm_tokenizer
from m3d_lit.tokens import IM_PATCH, LAMED_TOKENS, SEG

__all__ = ["LamedModel", "cast_for_training"]

_MODES = {
    "vision": ("frozen", "full"),
    "perceiver": ("frozen", "full"),
    "llm": ("frozen", "full", "lora"),
    "segmentation": ("frozen", "full"),
    "new_token_rows": ("frozen", "full"),
}


class LamedModel(nn.Module):
    """M3D-LaMed built from a model configuration (`presets.resolve`).

    Args:
        config: the resolved `ModelConfig` (or its dict form, as an official directory's is built).
        llm_path: local directory of the LLM and its tokenizer; None builds the preset's LLM from its
            config with a tokenizer trained on the shipped corpus.
        dtype: weight dtype of an LLM loaded from `llm_path`.
        tokenizer: a ready tokenizer (with the LaMed tokens) instead of the one `llm_path` names.

    Some settings select M3D-LaMed's computation (`models/official/lamed.py` sets them for an
    official directory; m3d-lit's presets keep the defaults): `seg_head_dropout`, `seg_prompt`,
    `loss.dice_smooth`, `stop_token_ids` and `segmentation.full_decoder` (`models/config.py`).
    """

    def __init__(
        self,
        config: ModelConfig | dict[str, Any],
        llm_path: str | Path | None = None,
        dtype: torch.dtype | None = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        config = ModelConfig.from_dict(config)
        self.config = config
        self.img_size = tuple(config.img_size)
        self.max_length = int(config.max_length)
        self.tokenizer = build_llm_tokenizer(llm_path) if tokenizer is None else tokenizer
        self.vision = registry.build(
            "vit3d", img_size=self.img_size, patch_size=config.patch_size, **config.vision.to_dict()
        )
        llm_config = {"vocab_size": len(self.tokenizer), **config.llm.to_dict()}
        self.llm = registry.build("causal_lm", path=llm_path, config=llm_config, dtype=dtype)
        hidden = self.llm.config.hidden_size
        self.perceiver = build_perceiver(
            config.perceiver.to_dict(), self.vision.grid, self.vision.hidden_size, hidden
        )
        self.num_visual_tokens = int(self.perceiver.num_tokens)
        if self.num_visual_tokens >= self.max_length:
            raise ValueError(
                f"{self.num_visual_tokens} visual tokens leave no room in max_length {self.max_length}"
            )
        self.new_tokens = self._add_token_rows(hidden)
        self.segmentation = registry.build(
            "segvol", img_size=self.img_size, patch_size=config.patch_size, **config.segmentation.to_dict()
        )
        prompt_dim = self.segmentation.prompt_dim
        head = [nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, prompt_dim)]
        if config.seg_head_dropout:
            head.append(nn.Dropout(float(config.seg_head_dropout)))
        self.seg_head = nn.Sequential(*head)
        self.seg_prompt = config.seg_prompt
        self.im_patch_id = self.tokenizer.convert_tokens_to_ids(IM_PATCH)
        self.seg_id = self.tokenizer.convert_tokens_to_ids(SEG)
        stops = [self.tokenizer.eos_token_id, *config.stop_token_ids]
        self.stop_ids = sorted({int(i) for i in stops if i is not None})
        # how answers become text; the official loader puts M3D's decoding here
        self.decode_text: Any = None
        decoder = unwrap(self.llm).get_decoder()
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        )

    def _add_token_rows(self, hidden: int) -> NewTokenRows:
        llm = unwrap(self.llm)
        rows = llm.get_input_embeddings().num_embeddings
        new_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in LAMED_TOKENS]
        if self.tokenizer.pad_token_id >= rows:  # a pad token added to a pretrained tokenizer
            new_ids.append(self.tokenizer.pad_token_id)
        if len(self.tokenizer) > rows:
            llm.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        head = llm.get_output_embeddings()
        new_tokens = NewTokenRows(new_ids, hidden, llm.get_input_embeddings().num_embeddings)
        new_tokens.init_from(llm.get_input_embeddings().weight, None if head is None else head.weight)
        return new_tokens

    # -- trainability -------------------------------------------------------------------------------
    def set_trainable(
        self, trainable: dict[str, str], lora: LoraConfig | dict[str, Any] | None = None
    ) -> None:
        """Set `frozen | full | lora` per component; keys left out are frozen.

        Args:
            trainable: `vision`, `perceiver`, `segmentation` (with `seg_head`): frozen|full; `llm`:
                frozen|full|lora; `new_token_rows`: frozen|full (the added tokens' embedding rows).
            lora: the LoRA settings (default: the config's `lora`); used when `llm` is `lora`.
        """
        for key, mode in trainable.items():
            if key not in _MODES or mode not in _MODES[key]:
                allowed = _MODES.get(key, sorted(_MODES))
                raise InputError("trainable", f"[{key!r}] = {mode!r} is not valid; allowed: {allowed}")
        modes = {key: trainable.get(key, "frozen") for key in _MODES}
        wrapped = hasattr(self.llm, "peft_config")
        if wrapped and modes["llm"] == "full":
            raise ValueError("llm already carries LoRA adapters; it cannot become fully trainable")
        if modes["llm"] == "lora" and not wrapped:
            self.llm = apply_lora(self.llm, LoraConfig.from_dict(lora or self.config.lora))
        self.vision.requires_grad_(modes["vision"] == "full")
        self.perceiver.requires_grad_(modes["perceiver"] == "full")
        self.segmentation.requires_grad_(modes["segmentation"] == "full")
        for param in self.segmentation.mask_decoder.unread_parameters():
            param.requires_grad_(False)
        self.seg_head.requires_grad_(modes["segmentation"] == "full")
        self.new_tokens.requires_grad_(modes["new_token_rows"] == "full")
        for name, param in self.llm.named_parameters():
            param.requires_grad_(modes["llm"] == "full" or (modes["llm"] == "lora" and "lora_" in name))

    def enable_gradient_checkpointing(
        self, llm: bool = True, vision: bool = False, seg: bool = False
    ) -> None:
        """Non-reentrant activation checkpointing of the LLM, vision and segmentation encoder blocks."""
        blocks.set_checkpointing(self, llm, vision, seg)

    def compile_blocks(self, **options: Any) -> None:
        """`torch.compile` each ViT block, decoder layer and segmentation encoder block (`blocks.py`).

        Args:
            **options: `torch.compile` arguments, e.g. `backend`, `mode`.
        """
        blocks.compile_blocks(self, **options)

    # -- building blocks ----------------------------------------------------------------------------
    def encode_images(self, images: Tensor) -> Tensor:
        """The visual tokens (B x N x H) of volumes (B x 1 x D x H x W): vision encoder, then perceiver."""
        patches, _ = self.vision(images.to(self._vision_dtype()))
        # an all-zero volume (image dropout, the blank control) takes no part in batch statistics
        return self.perceiver(patches, stats_rows=images.flatten(1).any(1))

    def embed(self, images: Tensor, input_ids: Tensor, visual: Tensor | None = None) -> Tensor:
        """Token embeddings with the visual tokens written over each row's `<im_patch>` placeholders.

        `visual` (B x N x H), when given, are the rows' visual tokens computed beforehand (`encode_images`,
        e.g. once per scan for several questions); `images` are then not read.
        """
        self._check_placeholders(input_ids)
        embeds = self.token_embeds(input_ids)
        visual = (self.encode_images(images) if visual is None else visual).to(embeds.dtype)
        # masked_scatter fills the True positions in row-major order: row by row, left to right.
        return embeds.masked_scatter((input_ids == self.im_patch_id).unsqueeze(-1), visual)

    def _check_placeholders(self, input_ids: Tensor) -> None:
        """Every row must hold exactly `num_visual_tokens` placeholders, or the visual tokens would slide
        into the wrong rows. The check is an asynchronous assert, so a GPU forward does not wait for it:
        on a CPU a mismatch raises here, naming the rows; on a GPU it stops the run with a device-side
        assert. (`LMCollator` makes every row's placeholders itself, so its batches always pass.)"""
        counts = (input_ids == self.im_patch_id).sum(1)
        try:
            torch._assert_async((counts == self.num_visual_tokens).all(), "placeholder count mismatch")
        except RuntimeError:
            bad = (counts != self.num_visual_tokens).nonzero().flatten().tolist()
            raise ValueError(
                f"row {bad[0]} has {int(counts[bad[0]])} {IM_PATCH} placeholders but the perceiver gives "
                f"{self.num_visual_tokens} visual tokens (rows with a mismatch: {bad})"
            ) from None

    def token_embeds(self, input_ids: Tensor) -> Tensor:
        base = unwrap(self.llm).get_input_embeddings()(input_ids)
        return self.new_tokens.embed(input_ids, base)

    def logits(self, hidden: Tensor) -> Tensor:
        base = unwrap(self.llm).get_output_embeddings()(hidden)
        return self.new_tokens.logits(hidden, base)

    def decode(
        self, embeds: Tensor, attention_mask: Tensor | None, positions: Tensor | None, cache: Any = None
    ) -> tuple[Tensor, Any]:
        """Last-layer hidden states (B x L x H) and the KV cache."""
        decoder = unwrap(self.llm).get_decoder()
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=cache is not None,
            **{self._cache_kw: cache},
        )
        return out.last_hidden_state, getattr(out, self._cache_kw, None)

    def _full_mask(self, attention_mask: Tensor) -> Tensor:
        """The attention mask a whole-sequence forward gives the decoder.

        For SDPA attention it is the B x 1 x L x L mask itself, which transformers takes as it is. Given
        the B x L padding mask, transformers first asks the device whether the batch is padded at all
        (to let SDPA run without a mask), and the host waits for the answer on every forward. The mask
        built here is the one it builds for a padded batch. Other attention implementations get the
        B x L mask."""
        if getattr(unwrap(self.llm).config, "_attn_implementation", None) != "sdpa":
            return attention_mask
        return _causal_padding_mask(attention_mask)

    def _vision_dtype(self) -> torch.dtype:
        return self.vision.patch_embedding.position_embeddings.dtype

    # -- training forward ---------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        masks: Tensor | None = None,
        seg_flags: Tensor | None = None,
        seg_rows: Tensor | None = None,
        label_positions: Tensor | None = None,
        full_logits: bool = False,
    ) -> dict[str, Any]:
        """Losses and outputs of one batch. `LMCollator`'s batches carry `seg_rows` and `label_positions`,
        found on the host, so the forward never waits for the device; without them they are found here.

        Args:
            images: B x 1 x D x H x W volumes, any float dtype (widened to the encoders' dtype here).
            input_ids: B x L token ids with `<im_patch>` placeholders.
            attention_mask: B x L, 1 on real tokens.
            labels: B x L targets, -100 off the answer (None: no LM loss).
            masks: with `seg_rows`, the mask of each row of `seg_rows` (S x 1 x D x H x W); without, one
                per batch row (rows that do not segment are not read).
            seg_flags: without `seg_rows`, B bools: the rows whose mask trains (with a `[SEG]` in the row).
            seg_rows: the rows that segment (S, long): a mask and a `[SEG]` token in the row.
            label_positions: flat indices `b * L + t` whose next token is labelled (`lm_loss.label_positions`).
            full_logits: also return the full `logits` (B x L x V) and compute `lm_loss` from them (the
                official computation, for parity checks); otherwise the head runs on labelled rows only.

        Returns `loss` (LM + w_dice Dice + w_bce BCE), `lm_loss` (None without labels), `dice`, `bce`,
        `seg_logits` (S x 1 x D x H x W for the rows in `seg_rows`, or None), `seg_rows`, and with labels
        `predicted`/`targets` (the argmax token at each labelled position and its label, N each);
        `logits` only with `full_logits`.
        """
        mask = self._full_mask(attention_mask)
        hidden, _ = self.decode(self.embed(images, input_ids), mask, _positions(attention_mask))
        out: dict[str, Any] = {"lm_loss": None}
        if full_logits:
            out["logits"] = self.logits(hidden)
        if labels is not None:
            positions = lm_loss.label_positions(labels) if label_positions is None else label_positions
            if full_logits:
                out["lm_loss"] = lm_loss.full_lm_loss(out["logits"], labels)
                out["targets"] = labels.flatten().index_select(0, positions + 1)
                out["predicted"] = out["logits"].detach().flatten(0, 1).index_select(0, positions).argmax(-1)
            else:
                out["lm_loss"], out["predicted"], out["targets"] = lm_loss.chunked_lm_loss(
                    self.logits, hidden, labels, positions
                )
        seg = self._segment_batch(images, input_ids, hidden, masks, seg_flags, seg_rows)
        weights = self.config.loss
        loss = weights.w_dice * seg["dice"] + weights.w_bce * seg["bce"]
        if out["lm_loss"] is not None:
            loss = loss + out["lm_loss"]
        return {"loss": loss, **out, **seg}

    def _segment_batch(
        self,
        images: Tensor,
        input_ids: Tensor,
        hidden: Tensor,
        masks: Tensor | None,
        seg_flags: Tensor | None,
        seg_rows: Tensor | None,
    ) -> dict[str, Any]:
        if masks is None:
            seg_rows = input_ids.new_zeros(0)
        elif seg_rows is None:
            has_seg = (input_ids == self.seg_id).any(1)
            if seg_flags is not None:
                has_seg = has_seg & seg_flags.to(has_seg.device).bool()
            seg_rows = has_seg.nonzero().flatten()
            masks = masks[seg_rows]
        if seg_rows.numel() == 0:
            zero = self._zero_seg_term(hidden)
            return {"dice": zero, "bce": zero, "seg_logits": None, "seg_rows": seg_rows}
        prompts = self.seg_head(self._seg_hidden(input_ids[seg_rows] == self.seg_id, hidden[seg_rows]))
        seg_dtype = self.segmentation.prompt_encoder.no_mask_embed.weight.dtype
        seg_logits = self.segmentation(images[seg_rows].to(seg_dtype), prompts.to(seg_dtype))
        numerator = self.config.loss.dice_smooth == "both"
        # one float copy of the (bool) masks, which both terms then share
        target = masks.to(torch.promote_types(seg_logits.dtype, torch.float32))
        return {
            "dice": dice_loss(seg_logits, target, smooth_numerator=numerator).mean(),
            "bce": bce_loss(seg_logits, target).mean(),
            "seg_logits": seg_logits,
            "seg_rows": seg_rows,
        }

    def _seg_hidden(self, is_seg: Tensor, hidden: Tensor) -> Tensor:
        """Hidden states (S x H) at the positions that predict `[SEG]` (the ones just before it): the
        first of them, or with `seg_prompt: mean` their average, as M3D-LaMed takes them."""
        before = torch.zeros_like(is_seg)
        before[:, :-1] = is_seg[:, 1:]
        if self.seg_prompt == "mean":
            weights = before.to(hidden.dtype).unsqueeze(-1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        where = before.float().argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), where]

    def _zero_seg_term(self, hidden: Tensor) -> Tensor:
        # DDP needs a gradient for every trainable parameter each step: touch them with weight 0.
        params = [p for m in (self.seg_head, self.segmentation) for p in m.parameters() if p.requires_grad]
        # in the dtype the mask losses have (at least fp32), so every rank's terms are alike under DDP
        zero = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        return zero + 0.0 * sum(p.float().sum() for p in params) if params else zero

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        on_step: Callable[[Tensor, Tensor], None] | None = None,
        visual: Tensor | None = None,
    ) -> dict[str, list]:
        """Batched answers to left-padded prompts, with a KV cache; a row stops at any of `stop_ids`.

        A row that has stopped leaves the batch (its cache rows are dropped), so it costs nothing while
        the others go on. `visual` (B x N x H), when given, are the rows' visual tokens computed
        beforehand (`encode_images`); `images` are then read only for rows that produce `[SEG]`.

        `on_step`, if given, sees each step's logits (B x V, at least float32; zeros for rows that have
        stopped) and chosen ids (B; pad once a row is done) as they are made: what streaming an answer or
        reading its first token's scores needs.

        Returns `texts` (answers without special tokens except `[SEG]`/box tokens), `ids` (the new
        token ids of each row up to and including its stop token), `seg_logits` (1 x D x H x W mask
        logits per row that produced `[SEG]`, else None; a `[SEG]` that is the first new token gets its
        mask too, where M3D-LaMed's own `generate` returns none) and `first_logits` (B x V logits, at
        least float32, of the first answer token, e.g. to score Yes against No).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts (the last column of attention_mask is 0)")
        batch = input_ids.shape[0]
        pad = self.tokenizer.pad_token_id
        stops = torch.tensor(self.stop_ids, device=input_ids.device)
        positions = _positions(attention_mask)
        hidden, cache = self.decode(
            self.embed(images, input_ids, visual), attention_mask, positions, cache=_new_cache()
        )
        hidden = hidden[:, -1]
        active = torch.arange(batch, device=input_ids.device)  # the batch rows still decoding
        seg_hidden: dict[int, list[Tensor]] = {}
        steps: list[Tensor] = []
        first_logits = None
        for _ in range(max_new_tokens):
            logits = at_least_fp32(self.logits(hidden))
            chosen = sample_next(logits, do_sample, temperature, top_p)
            next_ids = torch.full((batch,), pad, dtype=chosen.dtype, device=chosen.device)
            next_ids[active] = chosen
            if first_logits is None:
                first_logits = logits
            if on_step is not None:
                on_step(logits.new_zeros(batch, logits.shape[-1]).index_copy(0, active, logits), next_ids)
            for i in (chosen == self.seg_id).nonzero().flatten().tolist():
                seg_hidden.setdefault(int(active[i]), []).append(hidden[i])
            steps.append(next_ids)
            going = ~torch.isin(chosen, stops)
            if not bool(going.any()):
                break
            if not bool(going.all()):
                keep = going.nonzero().flatten()
                cache.batch_select_indices(keep)
                active, chosen = active[keep], chosen[keep]
                attention_mask, positions = attention_mask[keep], positions[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
            positions = positions[:, -1:] + 1
            hidden, cache = self.decode(self.token_embeds(chosen[:, None]), attention_mask, positions, cache)
            hidden = hidden[:, -1]
        ids = [self._until_stop(row) for row in torch.stack(steps, dim=1).tolist()]
        texts = [self._detokenize(row) for row in ids]
        seg_logits = self._segment_rows(images, seg_hidden, batch)
        return {"texts": texts, "ids": ids, "seg_logits": seg_logits, "first_logits": first_logits}

    def _until_stop(self, ids: list[int]) -> list[int]:
        ends = [i for i, token in enumerate(ids) if token in self.stop_ids]
        return ids[: ends[0] + 1] if ends else ids

    def _detokenize(self, ids: list[int]) -> str:
        if self.decode_text is not None:
            return self.decode_text(ids)
        ids = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
        drop = {self.tokenizer.pad_token_id, self.tokenizer.bos_token_id}
        return self.tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()

    def _segment_rows(
        self, images: Tensor, seg_hidden: dict[int, list[Tensor]], batch: int
    ) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * batch
        if seg_hidden:
            rows = sorted(seg_hidden)
            take = (lambda h: torch.stack(h).mean(0)) if self.seg_prompt == "mean" else (lambda h: h[0])
            seg_dtype = self.segmentation.prompt_encoder.no_mask_embed.weight.dtype
            prompts = self.seg_head(torch.stack([take(seg_hidden[r]) for r in rows])).to(seg_dtype)
            logits = self.segmentation(images[rows].to(seg_dtype), prompts)
            for i, row in enumerate(rows):
                out[row] = logits[i]
        return out


def _causal_padding_mask(attention_mask: Tensor) -> Tensor:
    """B x 1 x L x L bool, True where query i may attend key j: j <= i and key j is a real token."""
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def _positions(attention_mask: Tensor) -> Tensor:
    """Position ids counting only real tokens, so left padding does not shift the positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _new_cache() -> Any:
    return DynamicCache()


def cast_for_training(model: nn.Module, frozen_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Frozen parameters to `frozen_dtype`, trainable ones to fp32 (the bf16-mixed layout on a GPU).

    Floating buffers of modules that train (batch-norm statistics) go to fp32 with their weights.
    """
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else frozen_dtype)
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and all(p.requires_grad for p in params):
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.is_floating_point():
                    module._buffers[name] = buffer.float()
    return model
