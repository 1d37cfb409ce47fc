"""The demo's smoke version: every step of `make demo`, small, through the same code (no claim on the margin)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3d_lit.demo import main


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for dataset in ("cq500", "physionet"):
        for variant in ("scans", "blank", "swapped"):
            metrics = summary[dataset][variant]
            assert {"bleu1", "bleu4", "rougeL", "meteor"} <= set(metrics)
    assert "balanced_accuracy" in summary["cq500"]["scans"]
    assert {"synth", "stage 1", "stage 2", "stage 3", "total"} <= set(summary["seconds"])
    assert (tmp_path / "checkpoints" / "stage3" / "last.ckpt").is_file()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert "physionet" in out and "blank" in out and "scans against the controls" in out
