"""Stage-1 CLIP model on the tiny preset."""

from __future__ import annotations

import math

import pytest
import torch

from m3d_lit.losses.contrastive import clip_loss
from m3d_lit.models.build import build_lamed
from m3d_lit.models.clip import build_clip
from m3d_lit.models.presets import STAGE_TRAINABLE


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip("tiny")


def encode(clip, texts: list[str]) -> dict:
    return clip.text_tokenizer(
        texts, padding=True, truncation=True, max_length=clip.max_length, return_tensors="pt"
    )


def test_forward_features_and_scale(clip) -> None:
    tokens = encode(clip, ["Subdural hemorrhage on the left side.", "No hemorrhage. No fracture."])
    images = torch.rand(2, 1, *clip.img_size)
    img, txt, scale = clip(images, tokens["input_ids"], tokens["attention_mask"])
    embed_dim = clip.config["clip"]["embed_dim"]
    assert img.shape == (2, embed_dim) and txt.shape == (2, embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)  # exponentiated, not log(1/0.07)
    loss = clip_loss(img, txt, scale)
    loss.backward()
    assert (
        clip.logit_scale.grad is not None and clip.vision.patch_embedding.position_embeddings.grad is not None
    )


def test_scale_is_clamped_at_100() -> None:
    model = build_clip("tiny", {"text": {"num_hidden_layers": 1}, "vision": {"num_layers": 1}})
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    tokens = encode(model, ["Yes.", "No."])
    _, _, scale = model(torch.rand(2, 1, *model.img_size), tokens["input_ids"], tokens["attention_mask"])
    assert scale.item() == pytest.approx(100.0)


def test_vision_weights_move_to_lamed_by_prefix(clip) -> None:
    lamed = build_lamed("tiny")
    source = {k: v for k, v in clip.state_dict().items() if k.startswith("vision.")}
    target = {k for k in lamed.state_dict() if k.startswith("vision.")}
    assert set(source) == target
    lamed.load_state_dict(source, strict=False)
    torch.testing.assert_close(lamed.vision.blocks[0].attn.qkv.weight, clip.vision.blocks[0].attn.qkv.weight)


def test_stage1_trainability(clip) -> None:
    clip.set_trainable(STAGE_TRAINABLE[1])
    assert all(p.requires_grad for p in clip.parameters())
    clip.set_trainable({"vision": "frozen", "text": "full", "projections": "full"})
    assert not any(p.requires_grad for p in clip.vision.parameters())
    assert sum(p.numel() for p in clip.parameters() if p.requires_grad) == sum(
        p.numel() for n, p in clip.named_parameters() if not n.startswith("vision.")
    )
    with pytest.raises(ValueError, match="keys vision|text|projections"):
        clip.set_trainable({"perceiver": "full"})
    clip.set_trainable(STAGE_TRAINABLE[1])
