"""`m3d-lit predict`: a request file answered end to end, its bad rows named, a rerun resumed; and
LightningCLI's `predict` through the tasks' `predict_step`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO

from m3d_lit.cli import main


def _requests(tmp_path: Path, synthetic_raw: Path, prepared: list[Path]) -> Path:
    """A CSV with a NIfTI (relative path), a CQ500 scan folder of DICOM series, a prepared .npy, a missing
    scan and an empty question."""
    nifti = sorted((synthetic_raw / "physionet" / "ct_scans").glob("*.nii"))[0]
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "head.nii").symlink_to(nifti)
    dicom = sorted(p.parent for p in (synthetic_raw / "cq500").rglob("CT000000.dcm"))[0]
    npy = sorted((prepared[0] / "images").glob("*.npy"))[0]
    rows = [
        "scan,question",
        "scans/head.nii,Segment the hemorrhage.",
        f"{dicom},Is there a fracture?",
        f'{npy},"Is there an intracranial hemorrhage, and where?"',
        "scans/absent.nii,Is there a fracture?",
        "scans/head.nii,",
        "scans/head.nii,Segment the hemorrhage.",
        "scans/small.npy,Is there a fracture?",
    ]
    np.save(tmp_path / "scans" / "small.npy", np.zeros((1, 8, 16, 16), np.float32))
    path = tmp_path / "requests.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_predict_answers_a_request_file_names_bad_rows_and_resumes(
    stage3_checkpoint: Path,
    synthetic_raw: Path,
    prepared: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    requests = _requests(tmp_path, synthetic_raw, prepared)
    out = tmp_path / "out" / "predictions.jsonl"
    argv = ["predict", "--checkpoint", str(stage3_checkpoint.parents[1]), "--input", str(requests),
            "--out", str(out), "--max-new-tokens", "6", "--batch-size", "2", "--dtype", "float64"]  # fmt: skip
    assert main(argv) == 1  # some rows could not be answered
    err = capsys.readouterr().err
    assert "requests.csv: line 5 scan scans/absent.nii does not exist" in err
    assert "requests.csv: line 6 has an empty question" in err
    assert (
        "requests.csv: line 8 scan scans/small.npy is an .npy of size [8, 16, 16]; the model takes [32, 64, 64]"
        in err
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["line"] for line in lines) == [2, 3, 4, 7]
    by_line = {line["line"]: line for line in lines}
    assert by_line[2]["scan"] == "scans/head.nii" and by_line[2]["question"] == "Segment the hemorrhage."
    assert all(isinstance(line["answer"], str) for line in lines)
    # P(Yes) for the yes/no questions only, a number in [0, 1]
    assert {n for n, line in by_line.items() if "p_yes" in line} == {3, 4}
    assert all(0.0 <= by_line[n]["p_yes"] <= 1.0 for n in (3, 4))
    # the same question about the same scan, in two rows answered together (the scan read and encoded
    # once), gets the same answer; a mask, where the answer segments, lies over the scan's own file
    assert by_line[7]["answer"] == by_line[2]["answer"] and by_line[7].keys() == by_line[2].keys()
    shape = nib.load(tmp_path / "scans" / "head.nii").shape
    assert all(
        nib.load(out.parent / by_line[n]["mask_file"]).shape == shape
        for n in (2, 7)
        if "mask_file" in by_line[n]
    )

    # a rerun answers nothing again: every answerable row is already written
    before = out.read_text()
    assert main(argv) == 1
    assert out.read_text() == before
    assert "0 answered, 4 already in" in capsys.readouterr().out

    # a run killed while writing a line: the cut line is dropped and its request answered again
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:-1]) + text[-1][:10])
    assert main(argv) == 1
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["line"] for line in again) == [2, 3, 4, 7]


def test_predict_with_no_answerable_row_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"scan": "missing.nii", "question": "Is there a fracture?"}\nnot json\n')
    argv = ["predict", "--checkpoint", str(tmp_path / "never-loaded.ckpt"), "--input", str(requests),
            "--out", str(tmp_path / "p.jsonl")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "requests.jsonl: line 1 scan missing.nii does not exist" in err
    assert "requests.jsonl: line 2 is not JSON" in err
    assert not (tmp_path / "p.jsonl").exists()


def test_request_file_without_the_header_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    requests = tmp_path / "requests.csv"
    requests.write_text("volume,text\na.nii,Is there a fracture?\n")
    argv = ["predict", "--checkpoint", "c.ckpt", "--input", str(requests), "--out", str(tmp_path / "p.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the header is scan,question" in err


@pytest.mark.slow
def test_lightning_predict_uses_the_same_step(
    stage3_checkpoint: Path, prepared: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`m3d-lit predict -c stage3 --ckpt_path ...` (LightningCLI): the test split through `predict_step`,
    the records `eval` writes, into the run's log folder."""
    monkeypatch.chdir(tmp_path)
    argv = [
        "predict", "-c", str(REPO / "stages/stage3_finetune.yaml"), "-c", str(REPO / "stages/trainer/cpu.yaml"),
        "--model.preset", "tiny", "--model.init_from", "null", "--model.max_new_tokens", "4",
        "--data.roots", json.dumps([str(prepared[0])]), "--data.batch_size", "4",
        "--trainer.limit_predict_batches", "2", "--trainer.enable_progress_bar", "false",
        "--ckpt_path", str(stage3_checkpoint),
    ]  # fmt: skip
    assert main(argv) == 0
    (written,) = (tmp_path / "runs" / "stage3").glob("*/predictions.jsonl")
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert 0 < len(records) <= 8 and all(
        {"id", "question", "answer", "prediction"} <= set(r) for r in records
    )
    assert all(0.0 <= r["p_yes"] <= 1.0 for r in records if r["kind"] == "closed")
