"""An official M3D-LaMed directory (LamedLlama, LamedPhi3, with SegVol) as m3d-lit's `LamedModel`.

The directory is what M3D's `merge_lora_weights_and_save_hf_model.py` writes and what the released
`GoodBaiBai88/M3D-LaMed-*` repositories hold: `config.json`, the weights, a slow SentencePiece
tokenizer, `generation_config.json`. Every size is read from the config and checked against the
weight shapes; the sizes the official code hard-wires (ViT-B, SegVol's decoder) come from the config's
`fixture_hardwired` block when present (the parity kit's tiny models), else their official values.
The model is configured to compute what the official code computes (`official_config`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from m3d_lit.errors import InputError
from m3d_lit.models.config import ModelConfig
from m3d_lit.models.lamed import LamedModel
from m3d_lit.models.llm import assign_tensor, materialise_buffers, unwrap
from m3d_lit.models.official.files import TensorInfo, iter_weights, read_config, weight_index
from m3d_lit.models.official.text import build_tokenizer, m3d_decoder
from m3d_lit.tokens import LAMED_TOKENS

__all__ = ["FAMILIES", "build_official_lamed", "is_official_lamed", "official_config", "official_to_lamed"]

# model_type of the official classes -> the transformers family of their LLM
FAMILIES = {"lamed_llama": "llama", "lamed_phi3": "phi3"}
HARDWIRED = {
    "vit3d": {"hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "num_layers": 12},
    "segvol": {
        "embed_dim": 768,
        "vit_mlp_dim": 3072,
        "vit_num_layers": 12,
        "vit_num_heads": 12,
        "decoder_depth": 2,
        "decoder_mlp_dim": 2048,
        "decoder_num_heads": 8,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 256,
        "num_multimask_outputs": 3,
    },
}
# config.json keys of M3D's own, not of the LLM's transformers config
_M3D_KEYS = {
    "image_channel", "image_size", "patch_size", "vision_tower", "vision_select_layer",
    "vision_select_feature", "mm_projector_type", "proj_layer_type", "proj_layer_num",
    "proj_pooling_type", "proj_pooling_size", "mm_hidden_size", "segmentation_module", "seg_token_id",
    "fixture_hardwired", "fixture_rig", "auto_map", "architectures", "_name_or_path", "model_type",
    "transformers_version", "torch_dtype", "dtype",
}  # fmt: skip
# SegVol's point / box / mask prompt layers: M3D-LaMed never feeds them (kept aside for export)
_UNUSED_PREFIXES = (
    "model.seg_module.prompt_encoder.point_embeddings.",
    "model.seg_module.prompt_encoder.not_a_point_embed.",
    "model.seg_module.prompt_encoder.mask_downscaling.",
)
_PREFIXES = (
    ("model.vision_tower.vision_tower.", "vision."),
    ("model.mm_projector.", "perceiver."),
    ("model.seg_module.", "segmentation."),
    ("model.seg_projector.", "seg_head."),
    ("lm_head.", "llm.lm_head."),
    ("model.", "llm.model."),
)


def is_official_lamed(path: str | Path) -> bool:
    """True for a directory whose config.json names an M3D-LaMed model type."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") in FAMILIES
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _get(config: dict, key: str, directory: Path) -> Any:
    if key not in config:
        raise InputError(directory / "config.json", f"lacks {key!r}, which an M3D-LaMed config has")
    return config[key]


def _perceiver(config: dict, directory: Path) -> dict[str, Any]:
    kind = _get(config, "mm_projector_type", directory)
    layer = _get(config, "proj_layer_type", directory)
    pooling = _get(config, "proj_pooling_type", directory)
    if kind != "spp" or layer not in ("mlp", "linear") or pooling not in ("spatial", "sequence"):
        raise InputError(
            directory / "config.json",
            f"projector {kind!r} / {layer!r} / {pooling!r} pooling is not supported "
            "(spp with mlp or linear layers, spatial or sequence pooling)",
        )
    size = int(_get(config, "proj_pooling_size", directory))
    depth = int(_get(config, "proj_layer_num", directory))
    if pooling == "spatial":
        return {"name": "spatial_pool", "pool": size, "proj": layer, "depth": depth}
    return {"name": "sequence_pool", "pool": size**3, "proj": layer, "depth": depth}


def _llm(config: dict, family: str, vocab_rows: int) -> dict[str, Any]:
    fields = {k: v for k, v in config.items() if k not in _M3D_KEYS}
    # the rows the released weights have; Phi-3's base config says 32064, the saved model holds 32015
    return {**fields, "vocab_size": vocab_rows, "family": family}


def _segmentation(hard: dict, mm_hidden: int) -> dict[str, Any]:
    if int(hard["embed_dim"]) != mm_hidden:
        raise ValueError(f"SegVol width {hard['embed_dim']} differs from mm_hidden_size {mm_hidden}")
    return {
        "hidden_size": int(hard["embed_dim"]),
        "mlp_dim": int(hard["vit_mlp_dim"]),
        "num_layers": int(hard["vit_num_layers"]),
        "num_heads": int(hard["vit_num_heads"]),
        "decoder_depth": int(hard["decoder_depth"]),
        "decoder_heads": int(hard["decoder_num_heads"]),
        "decoder_mlp_dim": int(hard["decoder_mlp_dim"]),
        "full_decoder": True,
        "num_multimask_outputs": int(hard["num_multimask_outputs"]),
        "iou_head_depth": int(hard["iou_head_depth"]),
        "iou_head_hidden_dim": int(hard["iou_head_hidden_dim"]),
    }


def _stop_ids(directory: Path) -> list[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise InputError(path, f"is not valid JSON ({err})") from err
    return [int(i) for i in (eos if isinstance(eos, list) else [] if eos is None else [eos])]


def official_config(directory: Path, config: dict, vocab_rows: int) -> ModelConfig:
    """m3d-lit's model config for an M3D-LaMed config.json (`vocab_rows`: embedding rows of the weights)."""
    family = FAMILIES.get(config.get("model_type"))
    if family is None:
        raise InputError(
            directory / "config.json",
            f"model_type {config.get('model_type')!r} is not an M3D-LaMed LLM family ({sorted(FAMILIES)})",
        )
    for key, wanted in (("vision_tower", "vit3d"), ("vision_select_layer", -1),
                        ("vision_select_feature", "patch"), ("segmentation_module", "segvol"),
                        ("image_channel", 1)):  # fmt: skip
        if config.get(key, wanted) != wanted:
            raise InputError(
                directory / "config.json", f"{key} {config[key]!r} is not supported ({wanted!r})"
            )
    hard = {**HARDWIRED, **(config.get("fixture_hardwired") or {})}
    mm_hidden = int(_get(config, "mm_hidden_size", directory))
    if int(hard["vit3d"]["hidden_size"]) != mm_hidden:
        raise InputError(
            directory / "config.json",
            f"mm_hidden_size {mm_hidden} differs from the vision tower width {hard['vit3d']['hidden_size']}",
        )
    try:
        segmentation = _segmentation(hard["segvol"], mm_hidden)
    except (KeyError, ValueError) as err:
        raise InputError(directory / "config.json", f"SegVol sizes unusable: {err}") from err
    values = {
        "preset": "m3d",
        "img_size": list(_get(config, "image_size", directory)),
        "patch_size": list(_get(config, "patch_size", directory)),
        # M3D's training context (model_max_length 512), image tokens included
        "max_length": 512,
        "vision": {k: int(hard["vit3d"][k]) for k in ("hidden_size", "mlp_dim", "num_heads", "num_layers")},
        "perceiver": _perceiver(config, directory),
        "llm": _llm(config, family, vocab_rows),
        "segmentation": segmentation,
        "seg_head_dropout": 0.1,
        "seg_prompt": "mean",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.1},
        "loss": {"w_dice": 1.0, "w_bce": 1.0, "dice_smooth": "denominator"},
        "stop_token_ids": _stop_ids(directory),
    }
    try:
        return ModelConfig.from_dict(values)
    except InputError as err:
        raise InputError(directory / "config.json", f"describes no model m3d-lit can build: {err}") from None


def official_to_lamed(key: str) -> str | None:
    """An official state-dict key -> `LamedModel`'s key; None for SegVol's unused prompt layers."""
    if key.startswith(_UNUSED_PREFIXES):
        return None
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _check_shapes(directory: Path, index: dict[str, TensorInfo], own: dict[str, torch.Tensor]) -> list[str]:
    """The directory's keys the model takes, every shape checked against the model its config describes."""
    taken = []
    for key, info in index.items():
        target = official_to_lamed(key)
        if target is None:
            continue
        if target not in own:
            raise InputError(directory, f"holds {key}, which the model its config.json describes lacks")
        if tuple(info.shape) != tuple(own[target].shape):
            raise InputError(
                directory,
                f"{key} has shape {tuple(info.shape)} but config.json implies {tuple(own[target].shape)}",
            )
        taken.append(key)
    return taken


def build_official_lamed(directory: str | Path, dtype: torch.dtype | None = None) -> Any:
    """`LamedModel` holding every weight of an official M3D-LaMed directory, computing as M3D does.

    Built on the meta device; each saved tensor is then read once, straight into `dtype` (default
    float32) on the default device (`torch.device(...)` as a context), so a 7B model is never initialised
    at random first nor held twice. Under the meta device nothing is read (a skeleton for checks).
    """
    directory = Path(directory)
    config = read_config(directory)
    if config.get("model_type") not in FAMILIES:
        official_config(directory, config, 0)  # raises, naming the model_type
    index = weight_index(directory)
    embed = index.get("model.embed_tokens.weight")
    if embed is None:
        raise InputError(directory, "has no model.embed_tokens.weight")
    tokenizer = build_tokenizer(directory, rows=embed.shape[0])
    with torch.device("meta"):
        model = LamedModel(official_config(directory, config, embed.shape[0]), tokenizer=tokenizer)
    own = model.state_dict()
    taken = _check_shapes(directory, index, own)
    loaded = {official_to_lamed(key) for key in taken}
    derived = ("new_tokens.token_ids", "new_tokens.input_rows", "new_tokens.output_rows")
    missing = [k for k in own if k not in loaded and k not in derived]
    if missing:
        raise InputError(directory, f"lacks {len(missing)} weights the model needs, e.g. {missing[:2]}")
    device = torch.get_default_device()
    if device.type == "meta":
        return model
    dtype = dtype or torch.float32
    for key, tensor in iter_weights(directory, dtype, device, names=set(taken)):
        assign_tensor(model, official_to_lamed(key), tensor)
    _materialise_unsaved(model, tokenizer, device)
    model.to(dtype)  # the remaining floating buffers, as the official model casts them
    model.unused_official_weights = dict(iter_weights(directory, names=set(index) - set(taken)))
    model.decode_text = m3d_decoder(directory, tokenizer)
    return model


def _materialise_unsaved(model: Any, tokenizer: Any, device: torch.device) -> None:
    """Give what no checkpoint holds its values: the tied head, the rotary frequencies, and the added
    tokens' trainable rows (their rows of the loaded embedding and head) with their lookup."""
    llm = unwrap(model.llm)
    if llm.config.tie_word_embeddings:
        llm.tie_weights()
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in LAMED_TOKENS], device=device)
    embed = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    head = embed if head is None else head.weight
    assign_tensor(model, "new_tokens.token_ids", ids)
    assign_tensor(model, "new_tokens.input_rows", embed.detach()[ids].clone())
    assign_tensor(model, "new_tokens.output_rows", head.detach()[ids].clone())
    model.new_tokens.rebuild_slot()
    materialise_buffers(llm, device)
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"tensors left without values after loading: {left[:3]}")
