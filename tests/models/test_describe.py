"""The paper preset on the meta device: shapes and the `describe` figures."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED
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
    assert main(["--preset", "tiny", "--stage", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures["components"]) == {"vision", "text", "projections"}
    assert figures["trainable_params"] == figures["total_params"]
    stage2 = describe("tiny", 2)
    assert "lora" not in stage2["components"] and stage2["components"]["vision"]["trainable"] == 0


def test_describe_prints_the_input_the_llm_and_a_table_of_parts(capsys) -> None:
    assert main(["--preset", "small"]) == 0
    out = capsys.readouterr().out.splitlines()
    figures = describe("small", 3)
    assert figures["input"] == {"channels": 1, "img_size": [32, 128, 128], "patch_size": [4, 16, 16]}
    assert out[0] == (
        "m3d-lit describe: preset small, stage 3 (M3D-LaMed: 3D ViT -> perceiver -> LLM with LoRA -> "
        "segmentation)"
    )
    assert out[1] == (
        "  input: 1 x 32 x 128 x 128 (channels x D x H x W), patch 4 x 16 x 16: 512 patch tokens -> 64 visual "
        "tokens; context 256 tokens"
    )
    # the vocab the model has: the preset names none, so the tokenizer's length
    vocab = figures["llm"]["vocab_size"]
    assert out[2] == f"  llm: llama, 4 layers, width 512, 8 heads, MLP 1376, vocab {vocab}"
    rows = {line.split()[0]: line.split()[1:] for line in out[4:]}
    assert list(rows) == ["vision", "perceiver", "llm", "segmentation", "lora", "total"]
    assert rows["vision"] == ["11.2", "M", "11.2", "M"] and rows["llm"][2:] == ["4.1", "K"]
    assert rows["total"] == ["28.9", "M", "15.5", "M"]


@pytest.mark.parametrize(
    ("count", "shown"), [(7_018_954_592, "7.019 B"), (87_389_184, "87.4 M"), (32_768, "32.8 K"), (512, "512")]
)
def test_parameter_counts_read_as_people_read_them(count: int, shown: str) -> None:
    from m3d_lit.commands.describe import format_params

    assert format_params(count) == shown


KIT = SHARED / "data" / "m3d_official"


@pytest.mark.skipif(not KIT.is_dir(), reason=f"parity kit not found at {KIT}")
def test_describe_an_official_directory_counts_the_weights_it_holds(capsys) -> None:
    from m3d_lit.models.official.lamed import build_official_lamed

    directory = KIT / "lamed_phi3"
    assert main(["--model", str(directory), "--stage", "2", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    config = json.loads((directory / "config.json").read_text())
    assert figures["model"] == str(directory) and figures["input"]["img_size"] == config["image_size"]
    assert figures["llm"]["family"] == "phi3" and figures["llm"]["vocab_size"] == config["vocab_size"]
    assert figures["llm"]["num_hidden_layers"] == config["num_hidden_layers"]
    loaded = build_official_lamed(directory)  # every weight read: stage 2 adds no LoRA
    assert figures["total_params"] == sum(p.numel() for p in loaded.parameters())
