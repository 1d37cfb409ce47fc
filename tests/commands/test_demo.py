"""The demo's smoke version: every step of `make demo`, small, through the same code (no claim on the margin)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3d_lit.commands.demo import main


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for dataset in ("cq500", "physionet"):
        for variant in ("scans", "blank", "swapped"):
            metrics = summary[dataset][variant]
            assert {"bleu1", "bleu4", "rougeL", "meteor"} <= set(metrics)
    assert "balanced_accuracy" in summary["cq500"]["scans"]
    assert summary["cq500"]["scans"]["protocol"] == "m3d" and "rouge1" in summary["cq500"]["scans"]
    assert "pooled" in summary["cq500"]["scans"]["closed"]
    assert {"synth", "stage 1", "stage 2", "stage 3", "total"} <= set(summary["seconds"])
    for stage in ("stage1", "stage2", "stage3"):  # one run folder per stage: checkpoints beside the logs
        run = tmp_path / "runs" / stage / "version_0"
        assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.glob("events.out.tfevents.*"))
    model = json.loads((tmp_path / "eval" / "cq500" / "scans" / "metrics.json").read_text())["setup"]["model"]
    assert model["run"] == str(tmp_path / "runs" / "stage3" / "version_0") and len(model["sha256"]) == 64
    out = capsys.readouterr().out
    assert "physionet" in out and "blank" in out and "scans against the controls" in out
    assert "cq500 pooled closed AUROC: scans " in out and "ROUGE-1" in out


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
    from m3d_lit.commands import demo

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "synth.json").write_text(json.dumps(marker))
    monkeypatch.setattr(demo, "_run", _stop_at_first_step)
    with pytest.raises(_Stop, match=first_step):
        main(["--quick", "--out", str(tmp_path), "--seed", "0"])


def _metrics(auroc, ci, balanced, note=None):
    pooled = (
        {"auroc": auroc, "ci95": {"auroc": ci}} if auroc is not None else {"auroc": None, "auroc_note": note}
    )
    return {"bleu1": 0.5, "rouge1": 0.25, "meteor": 0.125, "balanced_accuracy": balanced,
            "closed": {"pooled": pooled}}  # fmt: skip


def test_table_and_margins_show_pooled_auroc_with_ci_for_scans_and_controls() -> None:
    from m3d_lit.commands import demo

    summary = {
        "cq500": {
            "scans": _metrics(0.9, [0.85, 0.95], 0.75),
            "blank": _metrics(0.5, [0.4, 0.6], 0.5),
            "swapped": _metrics(None, None, 0.5, "undefined: every reference is No (3 records)"),
        },
        "physionet": {
            v: {"bleu1": 0.1, "dice": d} for v, d in (("scans", 0.5), ("blank", 0.0), ("swapped", 0.1))
        },
    }
    table = demo._table(summary).splitlines()
    assert "m3d protocol" in table[0] and "ROUGE-1" in table[1] and "ROUGE-L" not in table[1]
    assert table[3].split() == [
        "cq500",
        "scans",
        "0.5000",
        "-",
        "-",
        "-",
        "0.2500",
        "0.1250",
        "0.7500",
        "0.9000",
        "-",
    ]
    margins = demo._margins(summary)
    assert (
        "cq500 pooled closed AUROC: scans 0.900 [95% CI 0.850, 0.950]; blank 0.500 [95% CI 0.400, 0.600]; "
        "swapped undefined: every reference is No (3 records)" in margins
    )
    assert (
        "physionet pooled" not in margins and "physionet dice: scans 0.500; blank 0.000 (+0.500)" in margins
    )
