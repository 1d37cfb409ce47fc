"""`m3d-lit eval` and `m3d-lit ask` on a tiny stage-3 checkpoint trained for two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3d_lit.cli import main


def _eval(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--limit", "9",
            "--max-new-tokens", "12", *extra]  # fmt: skip
    assert main(argv) == 0
    for name in ("predictions.jsonl", "metrics.json", "report.md"):
        assert (out / name).is_file(), name
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_eval_batched_equals_one_by_one(
    stage3_checkpoint: Path, prepared: list[Path], tmp_path: Path
) -> None:
    data = prepared[0] / "qa_test.jsonl"
    # float64: padding reorders sums only (~1e-15), so no near-tie of two fp32 logits can pick another
    # token in one run and not the other, on any CPU
    float64 = ("--dtype", "float64")
    batched = _eval(stage3_checkpoint, data, tmp_path / "b4", "--batch-size", "4", "--save-masks", *float64)
    single = _eval(stage3_checkpoint, data, tmp_path / "b1", "--batch-size", "1", *float64)
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    for record in batched:  # every [SEG] answer has its mask file (test_geometry checks where masks lie)
        if record["kind"] == "seg":
            assert ("mask_file" in record) == record["produced_seg"]
        assert "mask_file" not in record or (tmp_path / "b4" / record["mask_file"]).is_file()
    assert len({r["id"] for r in batched}) == len(batched) == 9
    metrics = json.loads((tmp_path / "b4" / "metrics.json").read_text())
    for key in ("bleu1", "bleu4", "rougeL", "meteor", "by_dataset", "by_kind"):
        assert key in metrics
    assert "Table 1" in (tmp_path / "b4" / "report.md").read_text()


@pytest.mark.slow
def test_eval_blank_images_control(stage3_checkpoint: Path, prepared: list[Path], tmp_path: Path) -> None:
    data = prepared[1] / "qa_test.jsonl"
    records = _eval(stage3_checkpoint, data, tmp_path / "blank", "--blank-images")
    setup = json.loads((tmp_path / "blank" / "metrics.json").read_text())["setup"]
    assert setup["blank_images"] is True and setup["swapped_images"] is False
    assert len(records) == min(9, len(data.read_text().splitlines()))
    swapped = _eval(stage3_checkpoint, data, tmp_path / "swapped", "--swap-images")
    assert json.loads((tmp_path / "swapped" / "metrics.json").read_text())["setup"]["swapped_images"] is True
    assert [r["id"] for r in swapped] == [r["id"] for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["physionet", "cq500"])
def test_ask_answers_raw_scans(
    stage3_checkpoint: Path, synthetic_raw: Path, dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if dataset == "physionet":
        volume = sorted((synthetic_raw / "physionet" / "ct_scans").glob("*.nii"))[0]
    else:
        volume = sorted(p.parent for p in (synthetic_raw / "cq500").rglob("CT000000.dcm"))[0]
    argv = ["ask", "--checkpoint", str(stage3_checkpoint), "--volume", str(volume),
            "--question", "Segment the hemorrhage.", "--max-new-tokens", "8", "--mask-out", str(tmp_path / "m.nii.gz")]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_ask_bad_input_is_one_line(
    stage3_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"\x1f\x8b truncated")
    argv = [
        "ask",
        "--checkpoint",
        str(stage3_checkpoint),
        "--volume",
        str(bad),
        "--question",
        "Is there a fracture?",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]
    assert main([*argv[:2], str(tmp_path / "missing.ckpt"), *argv[3:]]) == 2
