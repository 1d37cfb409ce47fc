"""SegVol-style segmentation module: shapes, gradients, loading SegVol-named weights."""

from __future__ import annotations

import pytest
import torch

from m3d_lit.errors import InputError
from m3d_lit.models.segmentation import SegmentationModule, load_segvol_weights, segvol_key

SIZES = {
    "img_size": (8, 32, 32),
    "patch_size": (4, 16, 16),
    "hidden_size": 32,
    "mlp_dim": 64,
    "num_layers": 1,
}
SIZES |= {"num_heads": 4, "decoder_depth": 2, "decoder_heads": 2, "decoder_mlp_dim": 64}


def test_forward_shape_and_every_parameter_gets_gradient() -> None:
    module = SegmentationModule(**SIZES)
    logits = module(torch.rand(2, 1, 8, 32, 32), torch.randn(2, 32))
    assert logits.shape == (2, 1, 8, 32, 32)
    logits.square().mean().backward()
    assert [n for n, p in module.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match=r"prompts \(2, 16\) must be \(2, 32\)"):
        module(torch.rand(2, 1, 8, 32, 32), torch.randn(2, 16))


def test_prompt_changes_the_mask() -> None:
    torch.manual_seed(0)
    module = SegmentationModule(**SIZES).eval()
    image = torch.rand(1, 1, 8, 32, 32)
    a, b = module(image, torch.randn(1, 32)), module(image, torch.randn(1, 32))
    assert (a - b).abs().max() > 1e-4


def _segvol_state_dict(module: SegmentationModule) -> dict[str, torch.Tensor]:
    """Our weights under SegVol's published names, plus the parts SegVol has and we drop."""
    state = {f"module.{key}": value.clone() for key, value in module.state_dict().items()}
    dim = module.prompt_dim
    tokens = state.pop("module.mask_decoder.mask_tokens.weight")
    state["module.mask_decoder.mask_tokens.weight"] = torch.cat([tokens, torch.randn(3, dim)])
    for i in (1, 2, 3):
        state[f"module.mask_decoder.output_hypernetworks_mlps.{i}.layers.0.weight"] = torch.randn(dim, dim)
    state["module.mask_decoder.iou_token.weight"] = torch.randn(1, dim)
    state["module.mask_decoder.iou_prediction_head.layers.0.weight"] = torch.randn(256, dim)
    state["module.prompt_encoder.point_embeddings.0.weight"] = torch.randn(1, dim)
    state["module.text_encoder.dim_align.weight"] = torch.randn(dim, 512)
    state["module.image_encoder.blocks.0.norm_cross_attn.weight"] = torch.randn(dim)
    return state


def test_load_segvol_weights_maps_names(tmp_path) -> None:
    torch.manual_seed(1)
    source = SegmentationModule(**SIZES)
    path = tmp_path / "segvol.pth"
    torch.save({"model": _segvol_state_dict(source)}, path)
    target = SegmentationModule(**SIZES)
    report = load_segvol_weights(target, path)
    assert len(report["loaded"]) == len(target.state_dict())
    assert "module.text_encoder.dim_align.weight" in report["skipped"]
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_segvol_key_rules() -> None:
    assert segvol_key("module.model.image_encoder.norm.weight") == "image_encoder.norm.weight"
    assert segvol_key("seg_module.mask_decoder.output_hypernetworks_mlps.0.layers.2.bias") == (
        "mask_decoder.output_hypernetworks_mlps.0.layers.2.bias"
    )
    assert segvol_key("mask_decoder.output_hypernetworks_mlps.2.layers.0.weight") is None
    assert segvol_key("mask_decoder.iou_prediction_head.layers.0.weight") is None
    assert segvol_key("image_encoder.blocks.3.cross_attn.qkv.weight") is None


def test_load_segvol_weights_errors(tmp_path) -> None:
    module = SegmentationModule(**SIZES)
    with pytest.raises(InputError, match="SegVol checkpoint not found"):
        load_segvol_weights(module, tmp_path / "none.pth")
    state = _segvol_state_dict(module)
    del state["module.image_encoder.norm.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(InputError, match=r"partial.pth: lacks 1 SegVol weights.*image_encoder.norm.weight"):
        load_segvol_weights(module, tmp_path / "partial.pth")
    state = _segvol_state_dict(module)
    state["module.image_encoder.norm.weight"] = torch.zeros(7)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match=r"image_encoder.norm.weight has shape \(7,\)"):
        load_segvol_weights(module, tmp_path / "wrong.pth")
