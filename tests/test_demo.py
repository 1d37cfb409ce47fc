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


class _Stop(Exception):
    pass


def _stop_at_first_step(step: str, command: list[str], cwd: Path, seconds: dict) -> None:
    raise _Stop(step)


@pytest.mark.parametrize("marker, first_step", [
    ({"scans": 24, "seed": 0}, "prepare cq500"),  # the same scans: reused
    ({"scans": 24, "seed": 5}, "synth"),  # another seed: made anew (prepare then sees the sources changed)
])  # fmt: skip
def test_rerun_reuses_the_synthetic_scans_of_the_same_plan_and_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marker: dict, first_step: str
) -> None:
    from m3d_lit import demo

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "synth.json").write_text(json.dumps(marker))
    monkeypatch.setattr(demo, "_run", _stop_at_first_step)
    with pytest.raises(_Stop, match=first_step):
        main(["--quick", "--out", str(tmp_path), "--seed", "0"])
