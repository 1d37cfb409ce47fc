"""The paper preset on the meta device: shapes and the `describe` figures."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from m3d_lit.commands.describe import main
from m3d_lit.models.build import build_lamed
from m3d_lit.models.describe import describe


@pytest.fixture(scope="module")
def paper():
    return build_lamed("paper", device="meta")


def test_paper_shapes_on_meta(paper) -> None:
    assert paper.num_visual_tokens == 256 and paper.max_length == 512 and paper.img_size == (32, 256, 256)
    with torch.device("meta"):
        images = torch.empty(2, 1, 32, 256, 256)
        patches, cls = paper.vision(images)
        assert patches.shape == (2, 2048, 768) and cls.shape == (2, 768)
        visual = paper.perceiver(patches)
        assert visual.shape == (2, 256, 4096)
        # No attention mask and a cache: the only way through transformers' mask code on meta tensors.
        hidden, _ = paper.decode(torch.empty(2, 512, 4096), None, None, DynamicCache())
        assert paper.logits(hidden).shape == (2, 512, 32000)
        prompts = paper.seg_head(hidden[:, -1])
        assert prompts.shape == (2, 768)
        assert paper.segmentation(images, prompts).shape == (2, 1, 32, 256, 256)


def test_describe_paper_stage3_figures() -> None:
    figures = describe("paper", 3)
    parts = figures["components"]
    assert parts["vision"]["params"] == 87_389_184
    assert figures["patch_tokens"] == 2048 and figures["visual_tokens"] == 256
    assert 6.73e9 < parts["llm"]["params"] < 6.75e9
    assert parts["llm"]["trainable"] == 2 * 4 * 4096  # only the new token rows
    assert parts["lora"]["params"] == 32 * (4 * 16 * 8192 + 3 * 16 * (4096 + 11008))  # ~40.0M
    assert figures["trainable_params"] < 0.5e9
    assert figures["total_params"] == sum(c["params"] for c in parts.values())


def test_describe_stage1_and_cli(capsys) -> None:
    assert main(["--preset", "tiny", "--stage", "1"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures["components"]) == {"vision", "text", "projections"}
    assert figures["trainable_params"] == figures["total_params"]
    stage2 = describe("tiny", 2)
    assert "lora" not in stage2["components"] and stage2["components"]["vision"]["trainable"] == 0
