"""The README's table of model presets holds the figures `m3d-lit describe` and `m3d-lit plan` compute."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import REPO

from m3d_lit.commands.describe import format_params
from m3d_lit.models.describe import describe
from m3d_lit.models.plan import PlanSettings, plan
from m3d_lit.models.presets import PRESETS

README = REPO / "README.md"


def _rows() -> dict[str, list[str]]:
    """The presets table's rows: preset name -> its cells."""
    text = README.read_text()
    start = text.index("| preset | input (D x H x W) | 3D ViT")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def _by(numbers: list[int]) -> str:
    return " x ".join(str(n) for n in numbers)


def _expected(preset: str) -> list[str]:
    """The computed cells of a preset's row: everything but what it is for."""
    config, figures = PRESETS[preset], describe(preset, 3)
    parts: dict[str, Any] = figures["components"]
    vision, llm = config.vision, figures["llm"]
    pool = config.perceiver.pool
    pool = [pool] * 3 if isinstance(pool, int) else list(pool)
    where = "random" if preset != "paper" else "LLaMA-2-7B (`--model.llm_path`)"
    result = plan(PlanSettings(preset=preset, stage=3))
    return [
        f"`{preset}`",
        _by(figures["input"]["img_size"]),
        f"{vision.num_layers} layers, width {vision.hidden_size}: {format_params(parts['vision']['params'])}",
        f"pool {_by(pool)}, {figures['patch_tokens']} -> {figures['visual_tokens']} tokens: "
        f"{format_params(parts['perceiver']['params'])}",
        f"{where}, {llm['num_hidden_layers']} layers, width {llm['hidden_size']}, vocab {llm['vocab_size']}: "
        f"{format_params(parts['llm']['params'])}",
        f"{format_params(figures['total_params'])} ({format_params(figures['trainable_params'])})",
        f"{result['total_gib']:.2f} GiB, +{result['per_sample_gib']:.2f} per sample",
    ]


def test_the_table_names_every_preset() -> None:
    assert sorted(_rows()) == sorted(PRESETS)
    header = "| preset | input (D x H x W) | 3D ViT (patch 4 x 16 x 16) |"
    assert header in README.read_text()
    assert {tuple(config.patch_size) for config in PRESETS.values()} == {(4, 16, 16)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_presets_row_holds_the_computed_figures(preset: str) -> None:
    cells = _rows()[preset]
    assert cells[:-1] == _expected(preset)
    assert cells[-1], f"{preset}: say what the preset is for"
