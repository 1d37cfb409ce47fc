"""`m3d-lit eval` and `m3d-lit ask` on a tiny stage-3 checkpoint trained for two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3d_lit.cli import main
from m3d_lit.data import phrasing


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
    assert metrics["protocol"] == "m3d" and metrics["setup"]["global_step"] == 2
    closed = [r for r in single if r["kind"] == "closed"]
    assert closed and all(0.0 <= r["p_yes"] <= 1.0 for r in closed)
    assert all("p_yes" not in r for r in single if r["kind"] != "closed")
    assert {r["finding"] for r in closed} <= set(phrasing.CLOSED_FINDINGS)
    assert all(r["patient"] == r["id"].rsplit(":", 1)[0] for r in single)
    assert "pooled" in metrics["closed"] and metrics["closed"]["pooled"]["n_p_yes"] == len(closed)
    _check_p_yes(stage3_checkpoint, data, closed[0])
    _check_tensorboard(tmp_path / "b4" / "tensorboard", metrics, step=2)


def _check_p_yes(checkpoint: Path, data: Path, record: dict) -> None:
    """p_yes again, from one plain forward pass over the prompt alone (no cache, no batch)."""
    import torch

    from m3d_lit.data.collate import LMCollator
    from m3d_lit.data.datasets import QAJsonlDataset
    from m3d_lit.inference.loading import load_model
    from m3d_lit.inference.predictor import yes_no_ids

    model = load_model(checkpoint).model  # LoRA unmerged: an independent path to the same numbers
    dataset = QAJsonlDataset(data, img_size=tuple(model.img_size))
    item = next(dataset[i] for i in range(len(dataset)) if dataset[i]["id"] == record["id"])
    batch = LMCollator(
        model.tokenizer, model.num_visual_tokens, model.max_length, model.img_size, generation=True
    )([item])
    with torch.no_grad():
        positions = torch.arange(batch["input_ids"].shape[1])[None]
        hidden, _ = model.decode(
            model.embed(batch["images"], batch["input_ids"]), batch["attention_mask"], positions
        )
        logits = model.logits(hidden[:, -1]).double()[0]
    yes, no = yes_no_ids(model.tokenizer)
    want = float(torch.softmax(logits[[yes, no]], dim=0)[0])
    # The same float32 network on the same unpadded prompt (measured: identical to the last bit; in a
    # left-padded batch of 4 the float32 logits round differently and p_yes moves by up to 2e-7).
    assert record["p_yes"] == pytest.approx(want, abs=1e-6)


def _check_tensorboard(folder: Path, metrics: dict, step: int) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/all/bleu1_m3d", "eval/all/meteor_m3d", "eval/all/balanced_accuracy"} <= tags
    assert "eval/all/closed/pooled/auroc" in tags or metrics["closed"]["pooled"]["auroc"] is None
    (point,) = acc.Scalars("eval/all/bleu1_m3d")
    assert point.step == step and point.value == pytest.approx(
        metrics["bleu1"], rel=1e-6
    )  # stored as float32


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
        volume, question = (
            sorted((synthetic_raw / "physionet" / "ct_scans").glob("*.nii"))[0],
            "Segment the hemorrhage.",
        )
    else:  # a CQ500 scan folder holds several series: the one read is named
        volume, question = next((synthetic_raw / "cq500").glob("CQ500-CT-*")), "Is there a fracture?"
    argv = ["ask", "--checkpoint", str(stage3_checkpoint), "--volume", str(volume), "--question", question,
            "--max-new-tokens", "8", "--mask-out", str(tmp_path / "m.nii.gz"), "--dtype", "float64"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert out[0].strip()
    if dataset == "cq500":
        assert "m3d-lit ask: read DICOM series " in captured.err and " files)" in captured.err
        assert out[1].startswith("P(Yes) = ") and 0.0 <= float(out[1].removeprefix("P(Yes) = ")) <= 1.0
    else:
        assert not any(line.startswith("P(Yes)") for line in out)  # not a yes/no question


@pytest.mark.slow
def test_eval_records_the_model_and_replaces_an_earlier_result_whole(
    stage3_checkpoint: Path, prepared: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import hashlib

    import m3d_lit

    out = tmp_path / "eval"
    # the stage folder (its latest run) and the prepared folder (its qa_test.jsonl)
    argv = ["eval", "--checkpoint", str(stage3_checkpoint.parents[2]), "--data", str(prepared[0]),
            "--out", str(out), "--limit", "2", "--max-new-tokens", "2", "--bootstrap", "0"]  # fmt: skip
    assert main(argv) == 0
    setup = json.loads((out / "metrics.json").read_text())["setup"]
    model = setup["model"]
    assert model["sha256"] == hashlib.sha256(stage3_checkpoint.read_bytes()).hexdigest()
    assert model["path"] == str(stage3_checkpoint) and model["run"] == str(stage3_checkpoint.parents[1])
    assert model["global_step"] == 2 and setup["data"] == str(prepared[0] / "qa_test.jsonl")
    assert model["trained_with"]["version"] == model["run_with"]["version"] == m3d_lit.__version__
    assert model["date"].endswith("+00:00") and model["sha256"] in (out / "report.md").read_text()
    assert main(argv) == 2
    assert "holds an earlier result" in capsys.readouterr().err
    (out / "masks").mkdir()
    (out / "masks" / "stale.nii.gz").write_text("from an earlier run")
    assert main([*argv, "--overwrite"]) == 0
    written = {p.name for p in out.iterdir()}
    assert {"metrics.json", "predictions.jsonl", "report.md"} <= written and "masks" not in written
    assert not list(tmp_path.glob(".eval.*"))  # no temporary folder left beside it


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
