"""Causal LM loading, the trainable new-token rows, LoRA, and token sampling."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
)

from m3d_lit.errors import InputError
from m3d_lit.models.config import LoraConfig
from m3d_lit.models.official.files import iter_weights, weight_index

log = logging.getLogger(__name__)

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}

__all__ = [
    "FAMILIES",
    "DropoutLinear",
    "NewTokenRows",
    "apply_lora",
    "assign_tensor",
    "build_causal_lm",
    "default_dtype",
    "load_causal_lm",
    "materialise_buffers",
    "sample_next",
    "unwrap",
]


def build_causal_lm(
    path: str | Path | None = None,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """A Hugging Face causal LM from a local directory, or a Llama built from a config dict.

    Tensors are made on the default device (`torch.device(...)` as a context, which Lightning's
    `configure_model` provides); under the meta device nothing is read or initialised.

    Args:
        path: local model directory (e.g. LLaMA-2-7B); `trust_remote_code` stays off. Its weights are read
            one tensor at a time straight into `dtype` on the default device (`load_causal_lm`).
        config: `LlamaConfig` fields for a randomly initialised model (used when `path` is None), plus
            optional `layer_initializer_range`: the init std of the decoder layers' linear weights, when
            it should differ from `initializer_range` (which then sets the embeddings and LM head), and
            optional `family` (`llama` by default, or `phi3`: then the fields are `Phi3Config`'s).
        dtype: weight dtype (None: the directory's saved dtype; for a config, the default dtype). A
            frozen LLM is made in its training dtype at once, never in fp32 first.
    """
    if path is not None:
        return load_causal_lm(path, dtype)
    if not config or "vocab_size" not in config:
        raise ValueError("build_causal_lm needs a path, or a config with vocab_size")
    options = dict(config)
    layer_std = options.pop("layer_initializer_range", None)
    family = options.pop("family", "llama")
    if family not in FAMILIES:
        raise ValueError(f"LLM family {family!r} is not one of {sorted(FAMILIES)}")
    config_class, model_class = FAMILIES[family]
    with default_dtype(dtype):
        model = model_class(config_class(**{"attn_implementation": "sdpa", **options}))
        if layer_std is not None:
            with torch.no_grad():
                for module in model.model.layers.modules():
                    if isinstance(module, nn.Linear):
                        module.weight.normal_(0.0, float(layer_std))
    return model


@contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Floating tensors made inside are `dtype` (None: unchanged)."""
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM from a local directory: built on the meta device, then each saved tensor is read once,
    straight into `dtype` on the default device, so no moment holds a second copy or another dtype.

    A directory whose tensor names or shapes are not the model's own (an older layout that transformers
    renames while loading) goes through `from_pretrained` instead, which is correct but holds more memory
    while loading; the log says so.

    Args:
        path: the model directory (config.json + weights).
        dtype: the weights' dtype (None: the saved dtype, as `from_pretrained` gives it).
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "LLM directory not found")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        dtype = dtype or _saved_dtype(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(path, f"not a loadable causal LM ({err})") from err
    device = torch.get_default_device()
    if device.type == "meta":
        return model
    wanted = _assignment(model, weight_index(path))
    if wanted is None:
        log.info("%s: tensor names differ from the model's; loading through from_pretrained", path)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False, dtype=dtype
            )
        except (OSError, ValueError) as err:
            raise InputError(path, f"not a loadable causal LM ({err})") from err
        return loaded.to(device)
    for name, tensor in iter_weights(path, dtype, device, names=wanted):
        assign_tensor(model, name, tensor)
    model.tie_weights()  # a tied head still points at the meta tensor the embeddings replaced
    materialise_buffers(model, device)
    return model.eval()  # as from_pretrained returns it


def _saved_dtype(config: Any) -> torch.dtype:
    saved = getattr(config, "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def _assignment(model: nn.Module, index: dict[str, Any]) -> set[str] | None:
    """The saved names to read into `model`, or None when the files do not hold exactly its tensors.

    Every parameter (a tied one once) and persistent buffer must be there with its shape; extra names
    may only be tied aliases or the per-layer rotary frequencies older checkpoints saved.
    """
    needed = dict(model.named_parameters())
    persistent = set(model.state_dict())
    needed.update({n: b for n, b in model.named_buffers() if n in persistent})
    if any(name not in index or tuple(index[name].shape) != tuple(t.shape) for name, t in needed.items()):
        return None
    extra = [n for n in index if n not in needed and n not in persistent and "rotary_emb.inv_freq" not in n]
    return None if extra else set(needed)


def assign_tensor(model: nn.Module, name: str, tensor: Tensor) -> None:
    """Make `tensor` the parameter (keeping its `requires_grad`) or buffer `name` of `model`, in place of
    what is there (a meta tensor, say); no copy is made."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = tensor


def materialise_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Give the buffers no checkpoint holds (rotary frequencies) their values on `device`.

    They are made on `device` and set by the model's own initialiser for their module, which computes
    them from the config as building the model would have.
    """
    owners = {}
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner._buffers[leaf] = torch.empty_like(buffer, device=device)
            owners[owner_name] = owner
    for owner in owners.values():
        model._init_weights(owner)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left without values after loading: {left[:3]}")


def unwrap(llm: nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # type: ignore[return-value]


class NewTokenRows(nn.Module):
    """Trainable embedding rows of the added tokens, for the input and the output embeddings.

    The full embedding and LM-head matrices stay frozen (for LLaMA-2-7B they are 2 x 131M parameters,
    about 4 GB of AdamW state); only these rows train and override the matrices' rows for their ids.

    Args:
        token_ids: ids of the added tokens.
        hidden_size: LLM width.
        vocab_size: rows of the LLM's embedding matrix.
    """

    def __init__(self, token_ids: Sequence[int], hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        token_ids = [int(i) for i in token_ids]
        if any(not 0 <= i < vocab_size for i in token_ids) or len(set(token_ids)) != len(token_ids):
            raise ValueError(
                f"new token ids {token_ids} must be distinct and inside the vocabulary of {vocab_size}"
            )
        ids = torch.tensor(token_ids, dtype=torch.long)
        self.register_buffer("token_ids", ids)
        self.register_buffer("slot", _slots(ids, vocab_size), persistent=False)
        self.input_rows = nn.Parameter(torch.zeros(ids.numel(), hidden_size))
        self.output_rows = nn.Parameter(torch.zeros(ids.numel(), hidden_size))

    def rebuild_slot(self) -> None:
        """Recompute the id -> row lookup from `token_ids` (after weights were assigned to a model built
        on the meta device, where this unsaved buffer has no values)."""
        self.slot = _slots(self.token_ids, self.slot.shape[0]).to(self.token_ids.device)

    @torch.no_grad()
    def init_from(self, embedding: Tensor, head: Tensor | None) -> None:
        """Start the rows (here and in the full matrices) as the mean of the other rows."""
        for rows, matrix in ((self.input_rows, embedding), (self.output_rows, head)):
            if matrix is None or matrix.is_meta:
                continue
            keep = self.slot[: matrix.shape[0]] < 0
            mean = matrix[keep].float().mean(0)
            rows.copy_(mean.expand_as(rows))
            matrix[self.token_ids] = mean.to(matrix.dtype)

    def embed(self, input_ids: Tensor, base: Tensor) -> Tensor:
        """Replace the embeddings `base` (B x L x C) at new-token positions by the trainable rows."""
        slot = self.slot[input_ids]
        rows = F.embedding(slot.clamp(min=0), self.input_rows).to(base.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows, base)

    def logits(self, hidden: Tensor, base: Tensor) -> Tensor:
        """Write `hidden @ output_rows.T` over the logit columns of the new tokens in `base` (... x V).

        In place, so no second ... x V tensor is made: `base` is the LM head's fresh output, and a linear
        layer's backward reads its input and weight, never its output.
        """
        new = hidden @ self.output_rows.to(hidden.dtype).t()
        return base.index_copy_(-1, self.token_ids, new.to(base.dtype))

    @torch.no_grad()
    def write_back(self, embedding: Tensor, head: Tensor | None) -> None:
        """Copy the trained rows into the full matrices (before exporting a plain HF model)."""
        embedding[self.token_ids] = self.input_rows.to(embedding.dtype)
        if head is not None:
            head[self.token_ids] = self.output_rows.to(head.dtype)


def _slots(token_ids: Tensor, vocab_size: int) -> Tensor:
    slot = torch.full((vocab_size,), -1, dtype=torch.long, device=token_ids.device)
    slot[token_ids] = torch.arange(token_ids.numel(), device=token_ids.device)
    return slot


def apply_lora(llm: PreTrainedModel, lora: LoraConfig) -> nn.Module:
    """Wrap `llm` with peft LoRA adapters on all its linear layers (the LM head excluded).

    Args:
        llm: the causal LM.
        lora: the adapters' settings (the model config's `lora` section).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=int(lora.r),
        lora_alpha=int(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft still calls transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(llm, config)
    _fold_dropout_into_lora_a(model)
    return model


class DropoutLinear(nn.Linear):
    """LoRA's down projection A with the adapter's input dropout folded in: `A(dropout(x))`.

    peft computes `B(A(dropout(x)))` after casting `x` to the adapters' dtype. Under bf16 autocast that
    cast is a float32 copy of every adapted input, and backward keeps, per adapted layer, the dropout's
    mask and its output (A's input) cast back to bf16. Here the input keeps its dtype (autocast casts the
    matmul as it casts the frozen layer's), and in training `A(dropout(x))` runs under non-reentrant
    activation checkpointing: backward keeps only `x`, which the query, key and value adapters (and gate
    and up) share, and redraws the same mask from the saved random state. Without autocast `x` is cast to
    the weight's dtype, as peft does. The parameter is still `lora_A.<adapter>.weight`.
    """

    def __init__(self, linear: nn.Linear, p: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias, self.p = linear.weight, linear.bias, float(p)

    def _down(self, x: Tensor) -> Tensor:
        if not _autocast(x):
            x = x.to(self.weight.dtype)
        return F.linear(F.dropout(x, self.p, self.training), self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.p > 0 and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # (a compiled layer's partitioner makes this choice itself: it recomputes cheap ops)
            return checkpoint(self._down, x, use_reentrant=False)
        return self._down(x)


def _autocast(x: Tensor) -> bool:
    """Whether autocast is on for `x`'s device (a device without autocast, e.g. meta, has it off)."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def _fold_dropout_into_lora_a(model: nn.Module) -> None:
    """Every peft LoRA linear layer: dropout folded into A (`DropoutLinear`), peft's input cast off."""
    from peft.tuners.lora import Linear as LoraLinear

    for layer in model.modules():
        if not isinstance(layer, LoraLinear):
            continue
        layer.cast_input_dtype_enabled = False
        for name, dropout in list(layer.lora_dropout.items()):
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            layer.lora_A[name] = DropoutLinear(layer.lora_A[name], p)
            layer.lora_dropout[name] = nn.Identity()


def sample_next(logits: Tensor, do_sample: bool, temperature: float, top_p: float) -> Tensor:
    """Next token ids (B) from logits (B x V): argmax, or temperature + nucleus sampling."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature {temperature} must be > 0 and top_p {top_p} in (0, 1]")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1)
    return order.gather(-1, choice).squeeze(-1)
