"""The model's configuration as typed dataclasses: one per component, checked when built.

`ModelConfig` holds one section per part of M3D-LaMed (and of the stage-1 CLIP model); the presets
(`models/presets.py`) are instances of it, and `presets.resolve` applies a run's nested `overrides` onto
one. Every dataclass checks its values in `__post_init__` (types, positive sizes, divisibility, known
names) and raises a one-line `InputError` naming the setting.

Two rules keep checkpoints and user code working:

- `to_dict()` gives the plain nested dict earlier versions kept: a setting the presets leave out is only
  written when it differs from its default (`_SAVED_IF_SET`), so the configuration a checkpoint's
  fingerprint hashes stays the same.
- Each section is also a read-only `Mapping` over that dict (`config["llm"]["hidden_size"]`, `**config.vision`),
  for code and checkpoints written against the dict form; m3d-lit's own code reads attributes.

The LLM and BERT sections pass settings they do not declare (`rope_theta`, `sliding_window`, the fields of
an official config.json) to the transformers config class in `extra`; `overrides.check_overrides` checks
the names a user gives against that class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from m3d_lit.errors import InputError
from m3d_lit.models.config_base import (
    Section,
    choice,
    divides,
    number,
    positive_int,
    triple,
)

__all__ = [
    "ClipConfig",
    "LLMConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "PerceiverConfig",
    "SegmentationConfig",
    "TextConfig",
    "VisionConfig",
]

PERCEIVERS = ("spatial_pool", "sequence_pool")
PROJECTIONS = ("mlp", "linear", "bn_mlp")
LLM_FAMILIES = ("llama", "phi3")  # the keys of `models.llm.FAMILIES`
CLIP_HEADS = ("linear", "batchnorm")
LOGIT_SCALES = ("exp", "direct")  # see `models.clip.SCALE_MODES`
DICE_SMOOTHING = ("both", "denominator")
SEG_PROMPTS = ("first", "mean")


@dataclasses.dataclass(frozen=True, eq=True)
class VisionConfig(Section):
    """The 3D ViT (`models/vision.py`, M3D's ViT-B/3D at the `paper` size)."""

    _SECTION: ClassVar[str] = "vision"
    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset(
        {"in_channels", "dropout_rate", "cls_token", "qkv_bias"}
    )

    hidden_size: int
    """Token width."""
    mlp_dim: int
    """Width of each block's MLP."""
    num_layers: int
    """Transformer blocks."""
    num_heads: int
    """Attention heads; must divide `hidden_size`."""
    in_channels: int = 1
    """Image channels (CT: 1)."""
    dropout_rate: float = 0.0
    """Dropout in the blocks and after the patch embedding."""
    cls_token: bool = True
    """Prepend a class token (the CLIP image feature; LaMed drops it)."""
    qkv_bias: bool = False
    """Bias on the attention's query/key/value projection."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "mlp_dim", "num_layers", "num_heads", "in_channels"):
            positive_int(f"vision.{name}", getattr(self, name))
        divides("vision", self.hidden_size, self.num_heads)
        number("vision.dropout_rate", self.dropout_rate, 0.0, 1.0)


@dataclasses.dataclass(frozen=True, eq=True)
class PerceiverConfig(Section):
    """The projector from ViT patch tokens to LLM-wide visual tokens (`models/perceiver.py`)."""

    _SECTION: ClassVar[str] = "perceiver"
    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset({"depth"})

    pool: int | Sequence[int] = 2
    """Pooling kernel: over the patch grid (`spatial_pool`, one int or three) or the token sequence."""
    name: str = "spatial_pool"
    """`spatial_pool` (3D average pooling of the grid) or `sequence_pool` (M3D's 1D pooling)."""
    proj: str = "mlp"
    """Projection after pooling: `mlp`, `linear` or `bn_mlp` (batch norm, then the MLP)."""
    depth: int | None = None
    """M3D's projector layout with this many linear layers (None: m3d-lit's two-layer MLP)."""

    def __post_init__(self) -> None:
        choice("perceiver.name", self.name, PERCEIVERS)
        choice("perceiver.proj", self.proj, PROJECTIONS)
        if self.name == "spatial_pool":
            triple("perceiver.pool", self.pool)
        else:
            positive_int("perceiver.pool", self.pool)
        if self.depth is not None:
            positive_int("perceiver.depth", self.depth)


@dataclasses.dataclass(frozen=True, eq=True)
class _Transformer(Section):
    """Sizes shared by the Hugging Face transformers m3d-lit builds (the LLM, BERT)."""

    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset({"vocab_size"})

    hidden_size: int
    """Token width."""
    num_hidden_layers: int
    """Transformer layers."""
    num_attention_heads: int
    """Attention heads; must divide `hidden_size`."""
    intermediate_size: int
    """Width of each layer's MLP."""
    max_position_embeddings: int
    """Longest sequence the position encoding covers."""
    vocab_size: int | None = None
    """Embedding rows (None: the tokenizer's length)."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further settings of the transformers config class (`rope_theta`, `hidden_act`, ...), passed as they are."""

    def __post_init__(self) -> None:
        where = self._SECTION
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            positive_int(f"{where}.{name}", getattr(self, name))
        positive_int(f"{where}.max_position_embeddings", self.max_position_embeddings)
        if self.vocab_size is not None:
            positive_int(f"{where}.vocab_size", self.vocab_size)
        if self.hidden_size % self.num_attention_heads:
            raise InputError(
                where,
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}",
            )
        if not isinstance(self.extra, Mapping):
            raise InputError(f"{where}.extra", f"must be a mapping, got {self.extra!r}")


@dataclasses.dataclass(frozen=True, eq=True)
class LLMConfig(_Transformer):
    """The causal LM (`models/llm.py`; LLaMA-2-7B at the `paper` size), built at random without `llm_path`."""

    _SECTION: ClassVar[str] = "llm"
    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset(
        {"vocab_size", "initializer_range", "layer_initializer_range", "family"}
    )

    initializer_range: float | None = None
    """Init std of the weights (None: the family's default, 0.02); with `layer_initializer_range` set, of
    the embeddings and the LM head only."""
    layer_initializer_range: float | None = None
    """Init std of the decoder layers' linear weights, when it should differ from `initializer_range`."""
    family: str = "llama"
    """The transformers model family: `llama` or `phi3`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("llm.family", self.family, LLM_FAMILIES)
        for name in ("initializer_range", "layer_initializer_range"):
            if getattr(self, name) is not None:
                number(f"llm.{name}", getattr(self, name))


@dataclasses.dataclass(frozen=True, eq=True)
class TextConfig(_Transformer):
    """The stage-1 text encoder (a BERT; BERT-base at the `paper` size)."""

    _SECTION: ClassVar[str] = "text"


@dataclasses.dataclass(frozen=True, eq=True)
class ClipConfig(Section):
    """The stage-1 contrastive heads (`models/clip.py`)."""

    _SECTION: ClassVar[str] = "clip"
    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset({"logit_scale"})

    embed_dim: int
    """Width of the shared image-text embedding."""
    max_length: int
    """Longest report, in text tokens."""
    head: str = "linear"
    """Projection: `linear` (M3D-CLIP) or `batchnorm` (batch norm first; keeps scratch encoders apart)."""
    logit_scale: str = "exp"
    """How the scale parameter multiplies the similarities: `exp` (clamped exp) or `direct` (M3D-CLIP)."""

    def __post_init__(self) -> None:
        positive_int("clip.embed_dim", self.embed_dim)
        positive_int("clip.max_length", self.max_length)
        choice("clip.head", self.head, CLIP_HEADS)
        choice("clip.logit_scale", self.logit_scale, LOGIT_SCALES)


@dataclasses.dataclass(frozen=True, eq=True)
class SegmentationConfig(Section):
    """The SegVol-style segmentation module (`models/segmentation.py`) that `[SEG]` prompts."""

    _SECTION: ClassVar[str] = "segmentation"
    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset(
        {"full_decoder", "num_multimask_outputs", "iou_head_depth", "iou_head_hidden_dim"}
    )

    hidden_size: int
    """Width of its image encoder (a ViT without class token)."""
    mlp_dim: int
    """Width of the encoder blocks' MLP."""
    num_layers: int
    """Encoder blocks."""
    num_heads: int
    """Encoder attention heads; must divide `hidden_size`."""
    decoder_depth: int
    """Two-way transformer layers of the mask decoder."""
    decoder_heads: int
    """Attention heads of the mask decoder."""
    decoder_mlp_dim: int
    """MLP width of the mask decoder."""
    full_decoder: bool = False
    """Compute SegVol's whole decoder (IoU head, multimask outputs) as the released weights expect."""
    num_multimask_outputs: int = 3
    """SegVol's extra mask outputs (with `full_decoder`)."""
    iou_head_depth: int = 3
    """Layers of SegVol's IoU head (with `full_decoder`)."""
    iou_head_hidden_dim: int = 256
    """Width of SegVol's IoU head (with `full_decoder`)."""

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "mlp_dim",
            "num_layers",
            "num_heads",
            "decoder_depth",
            "decoder_heads",
            "decoder_mlp_dim",
            "num_multimask_outputs",
            "iou_head_depth",
            "iou_head_hidden_dim",
        ):
            positive_int(f"segmentation.{name}", getattr(self, name))
        divides("segmentation", self.hidden_size, self.num_heads)


@dataclasses.dataclass(frozen=True, eq=True)
class LoraConfig(Section):
    """LoRA adapters on the LLM's linear layers (stage 3); the one home of these settings.

    Stage 3's `--model.lora` sets them for a run (as an override of this section).
    """

    _SECTION: ClassVar[str] = "lora"
    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset({"target_modules"})

    r: int = 16
    """Rank of the adapters (paper: 16)."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by alpha / r (paper: 32)."""
    dropout: float = 0.1
    """Dropout on the adapters' input (paper: 0.1)."""
    target_modules: str | list[str] = "all-linear"
    """Which modules get adapters: peft's `all-linear` (the LM head excluded) or a list of names."""

    def __post_init__(self) -> None:
        positive_int("lora.r", self.r)
        positive_int("lora.alpha", self.alpha)
        number("lora.dropout", self.dropout, 0.0, 1.0)
        names = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
            raise InputError(
                "lora.target_modules", f"{self.target_modules!r} must be a name or a list of names"
            )


@dataclasses.dataclass(frozen=True, eq=True)
class LossConfig(Section):
    """Weights of stage 3's mask loss terms; the one home of these settings.

    The loss is LM + w_dice * Dice + w_bce * BCE; stage 3's `--model.w_dice` / `--model.w_bce` set them
    for a run (as overrides of this section).
    """

    _SECTION: ClassVar[str] = "loss"
    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset({"dice_smooth"})

    w_dice: float = 1.0
    """Weight of the Dice loss."""
    w_bce: float = 1.0
    """Weight of the mask's binary cross-entropy."""
    dice_smooth: str = "both"
    """Where the Dice smoothing term goes: `both` (numerator and denominator) or `denominator` (M3D)."""

    def __post_init__(self) -> None:
        number("loss.w_dice", self.w_dice)
        number("loss.w_bce", self.w_bce)
        if self.dice_smooth not in DICE_SMOOTHING:
            raise InputError("loss.dice_smooth", f"{self.dice_smooth!r} must be 'both' or 'denominator'")


_SECTIONS: dict[str, type[Section]] = {
    "vision": VisionConfig,
    "perceiver": PerceiverConfig,
    "llm": LLMConfig,
    "text": TextConfig,
    "clip": ClipConfig,
    "segmentation": SegmentationConfig,
    "lora": LoraConfig,
    "loss": LossConfig,
}


@dataclasses.dataclass(frozen=True, eq=True)
class ModelConfig(Section):
    """A whole model: the input geometry and one section per component (a preset, or a resolved run)."""

    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset(
        {"preset", "text", "clip", "seg_head_dropout", "seg_prompt", "stop_token_ids"}
    )

    img_size: Sequence[int]
    """Scan size (depth, height, width) the models read."""
    patch_size: Sequence[int]
    """ViT patch size; must divide `img_size`."""
    max_length: int
    """Longest LaMed sequence in tokens, the visual tokens included."""
    vision: VisionConfig
    """The 3D ViT."""
    perceiver: PerceiverConfig
    """Patch tokens -> visual tokens."""
    llm: LLMConfig
    """The causal LM."""
    segmentation: SegmentationConfig
    """The `[SEG]`-prompted mask module."""
    text: TextConfig | None = None
    """The stage-1 BERT (None: a LaMed-only config, e.g. an official M3D-LaMed directory)."""
    clip: ClipConfig | None = None
    """The stage-1 heads (None as for `text`)."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """LoRA on the LLM."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """Stage-3 loss weights."""
    seg_head_dropout: float = 0.0
    """Dropout after the `[SEG]` head (M3D-LaMed: 0.1)."""
    seg_prompt: str = "first"
    """The `[SEG]` prompt: the hidden state before the `first` `[SEG]`, or the `mean` over all (M3D)."""
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    """Token ids that end an answer besides EOS."""
    preset: str | None = None
    """The preset this configuration came from (None: built directly)."""

    def __post_init__(self) -> None:
        for name, kind in _SECTIONS.items():
            value = getattr(self, name, None)
            if value is not None and not isinstance(value, kind):  # a dict section: build it
                object.__setattr__(self, name, kind.from_dict(value))
        triple("img_size", self.img_size)
        triple("patch_size", self.patch_size)
        positive_int("max_length", self.max_length)
        number("seg_head_dropout", self.seg_head_dropout, 0.0, 1.0)
        if self.seg_prompt not in SEG_PROMPTS:
            raise InputError("seg_prompt", f"{self.seg_prompt!r} must be 'first' or 'mean'")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.stop_token_ids):
            raise InputError("stop_token_ids", f"{self.stop_token_ids!r} must be token ids")

    @staticmethod
    def section_types() -> dict[str, type[Section]]:
        """The component sections by name, each with its dataclass."""
        return dict(_SECTIONS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from the nested dict form (a checkpoint's, an official directory's, `to_dict()`'s)."""
        if isinstance(data, ModelConfig):
            return data
        if not isinstance(data, Mapping):
            raise InputError("model config", f"must be a mapping, got {data!r}")
        known = cls.names()
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError("model config", f"unknown keys {unknown}; known: {sorted(known)}")
        values = {
            k: (_SECTIONS[k].from_dict(v) if k in _SECTIONS and v is not None else v) for k, v in data.items()
        }
        try:
            return cls(**values)
        except TypeError as err:
            raise InputError("model config", f"cannot be built: {err}") from None
