"""GPU memory and FLOPs of a training stage, estimated without a GPU (`m3d-lit plan`).

The model is a preset (with overrides) or an official M3D-LaMed directory, whose config.json, weight
shapes and tokenizer are read (no weight): its parameters are counted on the meta device and its reduced
copy (below) is built from its config, with the corpus tokenizer standing in for its own.

Memory per GPU, by part:
- weights: frozen parameters at `--frozen-dtype` (bf16: 2 bytes, no fp32 copy); counted on the meta device.
- trainable: fp32 parameter + fp32 gradient + AdamW's two fp32 moments = 16 bytes per parameter; with
  `--zero 1` the moments, with `--zero 2` also the gradients, are split over `--gpus`.
- activations: bytes of the tensors autograd saves for backward, MEASURED on CPU with
  `torch.autograd.graph.saved_tensors_hooks` while a reduced copy of the model runs one training forward
  in the GPU's dtypes (frozen LLM in bf16, trainable parts fp32, bf16 autocast), then scaled:
  * vision, perceiver, segmentation: the image is cut to 32 x 64 x 64 (or the preset's size when
    smaller) and each encoder to one block at full width. Every saved tensor there has one row per voxel
    or patch (SDPA attention keeps no N x N matrix), so bytes scale with the voxel count; block bytes are
    multiplied by the preset's block count.
  * LLM: the full sequence, one decoder layer, every width (hidden, intermediate, heads, vocab, LoRA r)
    divided by `--width-divisor` k with the head size kept. Every saved tensor is (tokens x one of those
    widths), so bytes scale by k; layer bytes are multiplied by the layer count.
  * what the model recomputes by itself is measured as it runs (a non-reentrant checkpoint's inputs are
    saved tensors too): LoRA's down projection with its dropout (`llm.DropoutLinear`) keeps only its
    input, the ViT blocks redo their GELU and normalised copies in backward, and the LM loss keeps only
    the labelled positions' hidden rows while their logits are recomputed one chunk at a time.
  * checkpointing (non-reentrant; LLM layers, ViT blocks and/or segmentation encoder blocks) keeps only
    each checkpointed block's input (measured in a forward pre-hook) and recomputes one block at a time
    during backward: the largest such block's full bytes are added once per sample as `transient`, with
    one loss chunk's logits (16 bytes x rows x vocab: bf16 logits, their fp32 copy, log-softmax and
    gradient), which does not grow with the micro-batch.
  * autocast's bf16 copies of the trainable matrices (2 bytes per trainable parameter of 2+ dims).
- reserve: CUDA context and allocator slack, a fixed `--reserve` GiB.
FLOPs per sample: 2 x parameters x tokens for every matrix a token passes (per component) plus
4 x tokens^2 x width per attention layer; training = forward x (3 for trainable parts, 2 for the frozen
LLM, which still passes gradients to its input, 1 for a frozen encoder), and checkpointing recomputes one
more forward of the checkpointed parts (hardware FLOPs; MFU uses model FLOPs without it). The LM head runs
on the labelled positions only (every text token of the measured batch: an upper bound for real answers),
and once more in backward, where its chunks are recomputed.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from m3d_lit.errors import InputError
from m3d_lit.models.blocks import CHECKPOINT_PARTS, checkpoint_parts
from m3d_lit.models.build import build_lamed
from m3d_lit.models.config import ModelConfig
from m3d_lit.models.lamed import LamedModel, cast_for_training
from m3d_lit.models.llm import unwrap
from m3d_lit.models.lm_loss import CHUNK_ROWS, label_positions
from m3d_lit.models.presets import STAGE_TRAINABLE, deep_merge, resolve
from m3d_lit.models.saved_bytes import saved_bytes
from m3d_lit.models.tokenizer import build_llm_tokenizer

__all__ = [
    "CHECKPOINTING",
    "PlanSettings",
    "count_params",
    "flops_per_sample",
    "measure_activations",
    "model_config",
    "plan",
    "synthetic_batch",
]

GIB = 1024**3
_MEASURE_IMG = (32, 64, 64)
CHECKPOINTING = ("none", *CHECKPOINT_PARTS, "all")  # and parts joined by commas, e.g. `vision,seg`
_MODEL_FIELDS = ("preset", "model", "stage", "overrides", "trainable", "lora_dropout")
_CACHE: dict[tuple[str, str], Any] = {}


@dataclass
class PlanSettings:
    """What `plan` estimates.

    Args:
        preset: model preset (`paper`, `small`, `tiny`).
        model: an official M3D-LaMed directory planned instead of the preset (None: the preset).
        stage: 2 or 3 (the LaMed stages).
        gpu_mem: GPU memory in GiB.
        micro_batch: samples per GPU per step.
        frozen_dtype: `bf16` (frozen weights held in bf16 only) or `fp32`.
        full_embeddings: train the whole embedding and output matrices instead of the new rows only.
        checkpointing: non-reentrant activation checkpointing: none, all, or parts joined by commas
            (llm, vision, seg), as the tasks' `gradient_checkpointing`.
        lora_dropout: LoRA dropout (None: the preset's); dropout > 0 saves a mask per adapted layer.
        zero: 0 (DDP), 1 (AdamW moments sharded) or 2 (moments and gradients sharded).
        gpus: GPUs sharing the optimizer state when zero > 0.
        seg_share: share of a micro-batch's rows that produce `[SEG]` (None: 1 in stage 3, 0 in stage 2).
        reserve: GiB for the CUDA context and allocator slack.
        width_divisor: k, the LLM width reduction of the activation measurement (None: 8 when it divides).
        overrides: values merged into the preset.
        trainable: per-component modes merged into the stage's defaults, e.g. `{"segmentation": "frozen"}`.
    """

    preset: str = "paper"
    model: str | None = None
    stage: int = 3
    gpu_mem: float = 24.0
    micro_batch: int = 2
    frozen_dtype: str = "bf16"
    full_embeddings: bool = False
    checkpointing: str = "llm"
    lora_dropout: float | None = None
    zero: int = 0
    gpus: int = 8
    seg_share: float | None = None
    reserve: float = 1.0
    width_divisor: int | None = None
    overrides: dict[str, Any] | None = None
    trainable: dict[str, str] | None = None

    def modes(self) -> dict[str, str]:
        return {**STAGE_TRAINABLE[self.stage], **(self.trainable or {})}

    def __post_init__(self) -> None:
        if self.stage not in (2, 3):
            raise InputError("--stage", f"{self.stage}: plan covers the LaMed stages 2 and 3")
        for name, value, low in (("micro-batch", self.micro_batch, 1), ("gpus", self.gpus, 1)):
            if value < low:
                raise InputError(f"--{name}", f"{value} must be >= {low}")
        if self.gpu_mem <= 0 or self.reserve < 0 or self.reserve >= self.gpu_mem:
            raise InputError(
                "--gpu-mem/--reserve",
                f"{self.gpu_mem} and {self.reserve} GiB: the GPU memory must exceed the reserve, which is >= 0",
            )
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            raise InputError("--lora-dropout", f"{self.lora_dropout} must be in [0, 1)")
        if self.width_divisor is not None and self.width_divisor < 1:
            raise InputError("--width-divisor", f"{self.width_divisor} must be >= 1")
        if self.frozen_dtype not in ("bf16", "fp32"):
            raise InputError("--frozen-dtype", f"{self.frozen_dtype!r} is not bf16 or fp32")
        try:
            checkpoint_parts(self.checkpointing)
        except ValueError as err:
            raise InputError("--checkpointing", str(err)) from None
        if self.zero not in (0, 1, 2):
            raise InputError("--zero", f"{self.zero} must be 0, 1 or 2")
        if self.seg_share is not None and not 0.0 <= self.seg_share <= 1.0:
            raise InputError("--seg-share", f"{self.seg_share} must be in [0, 1]")
        if self.model is not None and self.overrides:
            raise InputError(
                "--overrides",
                f"would be ignored: an M3D-LaMed directory ({self.model}) builds the whole model from its "
                "own config.json; remove them",
            )


def _build_meta(settings: PlanSettings, lora: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):
        model = build_lamed(settings.preset, settings.overrides, llm_path=settings.model)
        model.set_trainable(settings.modes(), lora=lora)
    return model


def model_config(settings: PlanSettings) -> ModelConfig:
    """The config of the planned model: the preset with its overrides, or the M3D-LaMed directory's."""
    if settings.model is None:
        return resolve(settings.preset, settings.overrides)
    return _memo("config", settings, ("model",), _official_config)


def _official_config(settings: PlanSettings) -> ModelConfig:
    with torch.device("meta"):  # reads the config, the weights' shapes and the tokenizer only
        return build_lamed(settings.preset, llm_path=settings.model).config


def _memo(kind: str, settings: PlanSettings, fields: tuple[str, ...], compute: Any) -> Any:
    """Results of the expensive steps, per the settings they depend on (a CLI run or test asks again)."""
    key = (kind, json.dumps([getattr(settings, f) for f in fields], sort_keys=True))
    if key not in _CACHE:
        _CACHE[key] = compute(settings)
    return copy.deepcopy(_CACHE[key])


def count_params(settings: PlanSettings) -> dict[str, dict[str, int]]:
    """Per component: `frozen`, `trainable` and `trainable_matrix` (2+ dims) parameter counts."""
    return _memo("count", settings, _MODEL_FIELDS + ("full_embeddings",), _count_params)


def measure_activations(settings: PlanSettings) -> dict[str, float]:
    """Saved bytes per sample at the preset's size, by part (see the module docstring for the scaling)."""
    return _memo("measure", settings, _MODEL_FIELDS + ("width_divisor",), _measure_activations)


def _count_params(settings: PlanSettings) -> dict[str, dict[str, int]]:
    config = model_config(settings)
    model = _build_meta(settings, _lora(config, settings))
    base = unwrap(model.llm)
    embeddings = {id(base.get_input_embeddings().weight)}
    if base.get_output_embeddings() is not None:
        embeddings.add(id(base.get_output_embeddings().weight))
    parts = {
        "vision": model.vision,
        "perceiver": model.perceiver,
        "llm": model.llm,
        "new_token_rows": model.new_tokens,
        "segmentation": nn.ModuleList([model.segmentation, model.seg_head]),
    }
    counts = {}
    for name, module in parts.items():
        entry = {"frozen": 0, "trainable": 0, "trainable_matrix": 0}
        for param in module.parameters():
            train = param.requires_grad or (settings.full_embeddings and id(param) in embeddings)
            entry["trainable" if train else "frozen"] += param.numel()
            entry["trainable_matrix"] += param.numel() if train and param.dim() >= 2 else 0
        counts[name] = entry
    return counts


def _lora(config: dict[str, Any], settings: PlanSettings) -> dict[str, Any]:
    lora = dict(config["lora"])
    if settings.lora_dropout is not None:
        lora["dropout"] = settings.lora_dropout
    return lora


def _llm_widths(config: dict[str, Any]) -> dict[str, int]:
    """The LLM widths the measurement divides by k (the key/value heads where the config sets them)."""
    keys = ("hidden_size", "num_attention_heads", "intermediate_size", "num_key_value_heads")
    return {key: int(config["llm"][key]) for key in keys if config["llm"].get(key)}


def _width_divisor(config: dict[str, Any], wanted: int | None) -> int:
    """k for the LLM measurement: it must divide every width, and the vocab must be in the config (a
    preset without one has its tokenizer's, which cannot shrink)."""
    dims = list(_llm_widths(config).values())
    vocab = config["llm"].get("vocab_size") or 0
    for k in (8, 4, 2, 1) if wanted is None else (wanted,):
        if k == 1 or (k > 1 and vocab and all(d % k == 0 for d in dims)):
            return k
    problem = f"{wanted} must divide the LLM widths {dims}"
    if not vocab:
        problem = f"{wanted}: this LLM's vocab is its tokenizer's, which a reduced copy cannot shrink: use 1"
    raise InputError("--width-divisor", problem)


def _measure_config(config: dict[str, Any], k: int, lora: dict[str, Any]) -> dict[str, Any]:
    """Overrides of the reduced model: image cut, one block per encoder, LLM widths / k."""
    img = [min(a, b) for a, b in zip(config["img_size"], _MEASURE_IMG)]
    llm = {key: width // k for key, width in _llm_widths(config).items()}
    if config["llm"].get("vocab_size"):
        # rounded up: a vocab k does not divide (Phi-3's 32015 rows) is overestimated by under k rows
        llm["vocab_size"] = -(-int(config["llm"]["vocab_size"]) // k)
    llm.update(num_hidden_layers=1, max_position_embeddings=max(config["max_length"], 64))
    return {
        "img_size": img,
        "vision": {"num_layers": 1},
        "segmentation": {"num_layers": 1},
        "llm": llm,
        "lora": {**lora, "r": max(1, int(lora["r"]) // k)},
    }


def synthetic_batch(
    model: nn.Module, batch: int, seq_len: int, seg: bool, seed: int = 0
) -> dict[str, Tensor]:
    """A full-length training batch: `<im_patch>` x N, random text, `[SEG]`, EOS; masks if `seg`."""
    gen = torch.Generator().manual_seed(seed)
    tok = model.tokenizer
    n = model.num_visual_tokens
    special = set(tok.all_special_ids) | {model.im_patch_id, model.seg_id}
    ordinary = torch.tensor([i for i in range(len(tok)) if i not in special])
    text = ordinary[torch.randint(len(ordinary), (batch, seq_len - n - 2), generator=gen)]
    tail = torch.tensor([model.seg_id if seg else ordinary[0].item(), tok.eos_token_id]).expand(batch, 2)
    input_ids = torch.cat([torch.full((batch, n), model.im_patch_id), text, tail], dim=1)
    labels = input_ids.clone()
    labels[:, :n] = -100
    masks = torch.rand(batch, 1, *model.img_size, generator=gen) > 0.9
    return {
        "images": torch.rand(batch, 1, *model.img_size, generator=gen),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "label_positions": label_positions(labels),
        # as `LMCollator` ships them: masks only for the rows that segment
        "masks": masks if seg else masks[:0],
        "seg_flags": torch.full((batch,), seg),
        "seg_rows": torch.arange(batch if seg else 0),
    }


def _reduced_model(settings: PlanSettings, config: ModelConfig, small: dict[str, Any]) -> LamedModel:
    """The model the activations are measured on: the planned one with `small` merged in."""
    if settings.model is None:
        return build_lamed(settings.preset, deep_merge(settings.overrides or {}, small))
    values = deep_merge(config.to_dict(), small)
    # the directory's token ids index its own vocab (left out, a family's defaults would too); the corpus
    # tokenizer stands in, its ids fit the reduced vocab (a toy vocab under its length grows to it)
    values["llm"].update(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    values["stop_token_ids"] = []
    return LamedModel(values)


def _measure_activations(settings: PlanSettings) -> dict[str, float]:
    config = model_config(settings)
    lora = _lora(config, settings)
    k = _width_divisor(config, settings.width_divisor)
    small = _measure_config(config, k, lora)
    model = _reduced_model(settings, config, small)
    model.set_trainable(settings.modes(), lora=small["lora"])
    cast_for_training(model).train()
    batch = synthetic_batch(model, 1, config["max_length"], seg=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), saved_bytes(model, model.img_size) as (saved, scopes):
        model(**batch)
    voxels = math.prod(config["img_size"]) / math.prod(model.img_size)
    layers = config["llm"]["num_hidden_layers"]
    scale = {
        "vision_block": voxels * config["vision"]["num_layers"],
        "vision_other": voxels,
        "perceiver": voxels * k,  # its output is LLM-wide: an upper bound
        "llm_layer": k * layers,
        "llm_other": k,
        "seg_block": voxels * config["segmentation"]["num_layers"],
        "seg_other": voxels,
    }
    out = {name: saved.get(name, 0) * factor for name, factor in scale.items()}
    out["llm_layer_full"] = saved.get("llm_layer", 0) * k
    out["vision_block_full"] = saved.get("vision_block", 0) * voxels
    out["seg_block_full"] = saved.get("seg_block", 0) * voxels
    out["llm_layer_input"] = scopes.block_inputs.get("llm_layer", 0) * k
    out["vision_block_input"] = scopes.block_inputs.get("vision_block", 0) * voxels
    out["seg_block_input"] = scopes.block_inputs.get("seg_block", 0) * voxels
    out["width_divisor"] = k
    return out


def _vocab(config: dict[str, Any]) -> int:
    """Rows of the LLM's embedding matrix: the preset's vocab, else the tokenizer's (as `LamedModel`)."""
    return int(config["llm"].get("vocab_size") or len(build_llm_tokenizer(None)))


def _attention_flops(tokens: int, width: int, layers: int) -> float:
    return 4.0 * tokens * tokens * width * layers


def flops_per_sample(
    settings: PlanSettings, counts: dict[str, dict[str, int]] | None = None
) -> dict[str, float]:
    """Forward FLOPs per component, and model / hardware (with recompute) training FLOPs per sample."""
    config = model_config(settings)
    counts = counts or count_params(settings)
    grid = [i // p for i, p in zip(config["img_size"], config["patch_size"])]
    patches = math.prod(grid)
    llm, vis, seg = config["llm"], config["vision"], config["segmentation"]
    seq, hidden = config["max_length"], llm["hidden_size"]
    total = {name: c["frozen"] + c["trainable"] for name, c in counts.items()}
    embed = _vocab(config) * hidden
    # the head runs on the labelled positions only: every text token of the measured batch, an upper bound
    head = 2.0 * embed * (seq - _visual_tokens(config) - 1)
    forward = {
        "vision": 2.0 * total["vision"] * (patches + 1)
        + _attention_flops(patches + 1, vis["hidden_size"], vis["num_layers"]),
        "perceiver": 2.0 * total["perceiver"] * patches / 8,
        # embedding lookups cost nothing; the output matrix is the head term
        "llm": 2.0 * (total["llm"] - 2 * embed) * seq
        + head
        + _attention_flops(seq, hidden, llm["num_hidden_layers"]),
        "segmentation": 2.0 * total["segmentation"] * patches
        + _attention_flops(patches, seg["hidden_size"], seg["num_layers"])
        + 2.0 * (seg["hidden_size"] // 4) * (seg["hidden_size"] // 8) * 8 * patches * 8,
    }
    share = _seg_share(settings)
    forward["segmentation"] *= share
    trains = {name: counts[name]["trainable"] > 0 for name in ("vision", "perceiver", "segmentation")}
    factor = {name: 3.0 if trains[name] else 1.0 for name in trains}
    factor["llm"] = 3.0 if counts["llm"]["trainable"] > counts["llm"]["frozen"] else 2.0
    model_flops = sum(forward[n] * factor[n] for n in forward)
    parts = checkpoint_parts(settings.checkpointing)
    recompute = head  # the loss chunks' logits are recomputed in backward
    if "llm" in parts:
        recompute += forward["llm"] - head
    if "vision" in parts:
        recompute += forward["vision"]
    if "seg" in parts:
        block = 4 * seg["hidden_size"] ** 2 + 2 * seg["hidden_size"] * seg["mlp_dim"]
        encoder = 2.0 * block * seg["num_layers"] * patches
        recompute += share * (encoder + _attention_flops(patches, seg["hidden_size"], seg["num_layers"]))
    return {
        "forward": forward,
        "train_model_flops": model_flops,
        "train_hardware_flops": model_flops + recompute,
    }


def _visual_tokens(config: dict[str, Any]) -> int:
    """Visual tokens the perceiver gives: the patch grid, or the patch sequence, pooled by its `pool`."""
    grid = [i // p for i, p in zip(config["img_size"], config["patch_size"])]
    pool = config["perceiver"].get("pool", 2)
    if config["perceiver"].get("name", "spatial_pool") == "sequence_pool":
        return math.prod(grid) // int(pool)
    pool = [pool] * 3 if isinstance(pool, int) else list(pool)
    return math.prod(g // q for g, q in zip(grid, pool))


def _seg_share(settings: PlanSettings) -> float:
    if settings.seg_share is not None:
        return settings.seg_share
    return 1.0 if settings.stage == 3 else 0.0


def _state_bytes(trainable: int, settings: PlanSettings) -> dict[str, float]:
    shards = settings.gpus if settings.zero else 1
    grad_shards = settings.gpus if settings.zero == 2 else 1
    return {
        "trainable_fp32": 4.0 * trainable,
        "gradients_fp32": 4.0 * trainable / grad_shards,
        "adamw_moments_fp32": 8.0 * trainable / shards,
    }


def _activation_bytes(act: dict[str, float], settings: PlanSettings, copies: float) -> dict[str, float]:
    """Per-GPU activation bytes at the micro-batch, with checkpointing applied."""
    parts = checkpoint_parts(settings.checkpointing)
    share = _seg_share(settings)

    def blocks(name: str, part: str) -> float:
        """A checkpointed encoder keeps each block's input, else everything its blocks save."""
        count = act[f"{name}_block"] / max(act[f"{name}_block_full"], 1)
        return act[f"{name}_block_input"] * count if part in parts else act[f"{name}_block"]

    layers = act["llm_layer"] / max(act["llm_layer_full"], 1)  # the LLM layer count
    per_sample = {
        "vision": blocks("vision", "vision") + act["vision_other"],
        "perceiver": act["perceiver"],
        "llm": (act["llm_layer_input"] * layers if "llm" in parts else act["llm_layer"]) + act["llm_other"],
        "segmentation": share * (blocks("seg", "seg") + act["seg_other"]),
    }
    b = settings.micro_batch
    out = {f"{name}_activations": value * b for name, value in per_sample.items()}
    recomputed = max(
        [0.0]
        + [act["llm_layer_full"]] * ("llm" in parts)
        + [act["vision_block_full"]] * ("vision" in parts)
        + [share * act["seg_block_full"]] * ("seg" in parts)
    )
    config = model_config(settings)
    rows = min(CHUNK_ROWS, b * max(config["max_length"] - 1, 1))
    out["transient"] = b * recomputed + 16.0 * rows * _vocab(config)
    out["autocast_weight_copies"] = copies
    return out


def plan(settings: PlanSettings) -> dict[str, Any]:
    """The memory (GiB per GPU, by part), FLOPs and fit verdict of `settings`."""
    counts = count_params(settings)
    frozen = sum(c["frozen"] for c in counts.values())
    trainable = sum(c["trainable"] for c in counts.values())
    matrices = sum(c["trainable_matrix"] for c in counts.values())
    act = measure_activations(settings)
    weight_bytes = {"frozen_weights": frozen * (2.0 if settings.frozen_dtype == "bf16" else 4.0)}
    fixed = {**weight_bytes, **_state_bytes(trainable, settings)}
    fixed["reserve"] = settings.reserve * GIB
    variable = _activation_bytes(act, settings, 2.0 * matrices)
    parts = {**fixed, **variable}
    total = sum(parts.values())
    # what one more sample adds (the loss chunk's logits, for one, do not grow with the micro-batch)
    one, two = (sum(_activation_bytes(act, replace(settings, micro_batch=b), 0.0).values()) for b in (1, 2))
    per_sample = two - one
    room = settings.gpu_mem * GIB - (total - per_sample * settings.micro_batch)
    flops = flops_per_sample(settings, counts)
    return {
        "settings": asdict(settings),
        "params": {"frozen": frozen, "trainable": trainable, "by_component": counts},
        "memory_gib": {name: value / GIB for name, value in parts.items()},
        "total_gib": total / GIB,
        "per_sample_gib": per_sample / GIB,
        "fits": total <= settings.gpu_mem * GIB,
        "max_micro_batch": max(0, int(room // per_sample)) if per_sample > 0 else None,
        "flops": {
            "forward_tflop": {n: v / 1e12 for n, v in flops["forward"].items()},
            "train_model_tflop_per_sample": flops["train_model_flops"] / 1e12,
            "train_hardware_tflop_per_sample": flops["train_hardware_flops"] / 1e12,
        },
        "measured": {"width_divisor": act["width_divisor"], "image": list(_MEASURE_IMG)},
    }
