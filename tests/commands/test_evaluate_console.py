"""What `m3d-lit eval` prints: the scores table as `m3d-lit score` prints it, and what `--save-masks` wrote
(in one line, also when no answer produced `[SEG]`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from m3d_lit.cli import main
from m3d_lit.inference.predictor import Prediction, Predictor


def _eval(checkpoint: Path, data: Path, out: Path, *extra: str) -> None:
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
            "--max-new-tokens", "4", "--bootstrap", "20", *extra]  # fmt: skip
    assert main(argv) == 0


def _answers_with_masks(monkeypatch: pytest.MonkeyPatch, mask: torch.Tensor | None) -> None:
    """Every answer holds `[SEG]` with `mask`'s logits (None: no answer holds it), whatever the model says:
    a model trained for two steps answers at random."""
    real = Predictor.predict

    def predict(self: Predictor, requests: object, batch_size: int = 8) -> Iterator[Prediction]:
        for prediction in real(self, requests, batch_size):
            yield dataclasses.replace(prediction, seg_logits=mask)

    monkeypatch.setattr(Predictor, "predict", predict)


def test_eval_prints_the_scores_table_score_prints(
    stage3_checkpoint: Path, prepared: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = prepared[0] / "qa_test.jsonl"
    _eval(stage3_checkpoint, data, tmp_path / "eval", "--limit", "12")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{data} (scans): 12 samples, protocol m3d")
    assert printed[-1].startswith("wrote ") and "--save-masks" not in "\n".join(printed)
    assert main(["score", str(tmp_path / "eval" / "predictions.jsonl"), "--bootstrap", "20"]) == 0
    scored = capsys.readouterr().out.splitlines()
    assert scored[0].endswith(": 12 samples, protocol m3d")
    # the same tables, closed questions' AUROC included: eval prints what score computes from its file
    assert printed[1:-1] == scored[1:] and any("AUROC" in line for line in scored)


def test_save_masks_without_a_seg_answer_says_so_and_leaves_no_masks_folder(
    stage3_checkpoint: Path, prepared: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _answers_with_masks(monkeypatch, None)
    out = tmp_path / "eval"
    _eval(stage3_checkpoint, prepared[1] / "qa_test.jsonl", out, "--save-masks")
    lines = [line for line in capsys.readouterr().out.splitlines() if "--save-masks" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "--save-masks: no mask written: no answer produced [SEG] ("
    )
    assert "segmentation questions" in lines[0]  # PhysioNet's test split asks for masks
    assert not (out / "masks").exists()


def test_save_masks_says_how_many_masks_it_wrote(
    stage3_checkpoint: Path, prepared: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _answers_with_masks(monkeypatch, torch.zeros(1, 32, 64, 64))
    out = tmp_path / "eval"
    _eval(stage3_checkpoint, prepared[0] / "qa_test.jsonl", out, "--save-masks", "--limit", "3")
    lines = [line for line in capsys.readouterr().out.splitlines() if "--save-masks" in line]
    assert lines == [f"--save-masks: 3 of 3 answers produced [SEG]: their masks are in {out / 'masks'}/"]
    assert len(list((out / "masks").glob("*.nii.gz"))) == 3
