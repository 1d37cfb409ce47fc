"""The stage-1 CLIP model: 3D ViT + BERT, CLS features projected and L2-normalised."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from m3d_lit.errors import InputError
from m3d_lit.models import registry
from m3d_lit.models.config import LOGIT_SCALES, ModelConfig
from m3d_lit.models.presets import resolve
from m3d_lit.models.tokenizer import build_text_tokenizer

__all__ = ["ClipModel", "build_clip", "MAX_LOGIT_SCALE", "SCALE_MODES"]

MAX_LOGIT_SCALE = 100.0
_MODES = ("frozen", "full")
# `exp`: the parameter is log(scale), exponentiated and clamped to <= 100 (CLIP's recipe, m3d-lit's default);
# `direct`: the parameter multiplies the similarities as it is (what M3D-CLIP's code does).
SCALE_MODES = LOGIT_SCALES


def _projection(head: str, width: int, embed_dim: int) -> nn.Module:
    """`linear` (M3D-CLIP) or `batchnorm`: batch normalisation, then the linear projection.

    Encoders trained from scratch on similar-looking volumes start with features that barely differ
    between samples; with a plain linear head the contrastive loss then collapses them to one point
    (measured on the demo data: loss stuck at log(batch), linear-probe accuracy falling). Normalising each
    feature over the batch keeps the differences at unit scale; at inference it is a fixed affine map.
    """
    if head == "linear":
        return nn.Linear(width, embed_dim)
    if head == "batchnorm":
        return nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, embed_dim))
    raise ValueError(f"clip head {head!r} is not linear | batchnorm")


class ClipModel(nn.Module):
    """Image-text contrastive model; `vision.*` names match `LamedModel`'s.

    `config.clip.logit_scale` (`SCALE_MODES`, default `exp`) says how the `logit_scale` parameter
    turns into the multiplier of the cosine similarities.

    Args:
        config: the resolved `ModelConfig` (`presets.resolve`), or its dict form.
        text_path: local BERT directory (weights + tokenizer); None builds the preset's BERT from its
            config with a WordPiece tokenizer trained on the shipped corpus.
        tokenizer: the text tokenizer to use instead of the one `text_path` gives (the BERT is then
            built from `config.text` when `text_path` is None).
    """

    def __init__(
        self,
        config: ModelConfig | dict[str, Any],
        text_path: str | Path | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        config = ModelConfig.from_dict(config)
        if config.clip is None or config.text is None:
            raise InputError("model config", "has no clip and text sections: it describes no CLIP model")
        self.config = config
        self.img_size = tuple(config.img_size)
        self.max_length = int(config.clip.max_length)
        self.scale_mode = config.clip.logit_scale
        self.text_tokenizer = tokenizer if tokenizer is not None else build_text_tokenizer(text_path)
        self.vision = registry.build(
            "vit3d", img_size=self.img_size, patch_size=config.patch_size, **config.vision.to_dict()
        )
        text_config = {
            "vocab_size": len(self.text_tokenizer),
            "pad_token_id": self.text_tokenizer.pad_token_id,
            **config.text.to_dict(),
        }
        self.text = registry.build("bert", path=text_path, config=text_config)
        embed_dim = int(config.clip.embed_dim)
        head = config.clip.head
        self.image_proj = _projection(head, self.vision.hidden_size, embed_dim)
        self.text_proj = _projection(head, self.text.config.hidden_size, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def set_trainable(self, trainable: dict[str, str]) -> None:
        """`vision`, `text`, `projections` (both projections and the logit scale): frozen|full; missing: frozen."""
        for key, mode in trainable.items():
            if key not in ("vision", "text", "projections") or mode not in _MODES:
                raise InputError(
                    "trainable", f"[{key!r}] = {mode!r}: keys vision|text|projections, values {_MODES}"
                )
        full = {key: trainable.get(key, "frozen") == "full" for key in ("vision", "text", "projections")}
        self.vision.requires_grad_(full["vision"])
        self.text.requires_grad_(full["text"])
        for part in (self.image_proj, self.text_proj):
            part.requires_grad_(full["projections"])
        self.logit_scale.requires_grad_(full["projections"])

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image features, B x embed_dim."""
        # batches carry volumes in their stored dtype (a float16 cache): widened here, on the device
        _, cls = self.vision(images.to(self.vision.patch_embedding.position_embeddings.dtype))
        return F.normalize(self.image_proj(cls), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised text features from the CLS hidden state, B x embed_dim."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def scale(self) -> Tensor:
        """The multiplier of the cosine similarities, as `scale_mode` makes it from `logit_scale`."""
        if self.scale_mode == "direct":
            return self.logit_scale.float()
        return self.logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(image features, text features, the multiplier `scale()`)."""
        return self.encode_image(images), self.encode_text(input_ids, attention_mask), self.scale()


def build_clip(
    preset: str, overrides: dict[str, Any] | None = None, text_path: str | Path | None = None
) -> ClipModel:
    """Build `ClipModel` from a preset (all parameters trainable until `set_trainable`).

    Args:
        preset: `tiny`, `small` or `paper`.
        overrides: nested values deep-merged into the preset.
        text_path: local BERT directory; None builds from the preset.
    """
    return ClipModel(resolve(preset, overrides), text_path)
