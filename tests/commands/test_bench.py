"""`m3d-lit bench`: the scores of each task against hand-computed cases, data discovery, and all eight tasks
end to end on a tiny model (stage 3 and stage 1 trained one step) over synthetic M3D-Data and brain CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import built

from m3d_lit.boxes import format_box
from m3d_lit.commands import bench, synth
from m3d_lit.errors import InputError
from m3d_lit.evaluation import choice, referring, retrieval, segmentation

SHAPE = (16, 32, 32)
# The tiny preset at 16x32x32 with one layer per stack: 4 visual tokens, fast on a CPU.
OVERRIDES = {
    "img_size": list(SHAPE),
    "vision": {"num_layers": 1},
    "llm": {"num_hidden_layers": 1},
    "text": {"num_hidden_layers": 1},
    "segmentation": {"num_layers": 1},
}


# -- scores ------------------------------------------------------------------------------------------
def test_parse_choice() -> None:
    question = "Which organ? Choices: A. Brain B. Liver C. Lung D. Kidney"
    assert choice.parse_choice("B. Liver", question) == "B"
    assert choice.parse_choice(" (C) lung", question) == "C"
    assert choice.parse_choice("It is the kidney.", question) == "D"
    assert choice.parse_choice("Brain or liver", question) is None  # two choices named
    assert choice.parse_choice("A lesion", question) is None  # the article, not a letter
    assert choice.parse_choice("Apple", question) is None
    assert choice.parse_choice("", question) is None


def test_choice_metrics_by_type() -> None:
    q = "Q? Choices: A. Axial B. Coronal C. Sagittal D. Oblique"
    records = [
        {"id": "t/2", "question": q, "answer": "A. Axial", "prediction": "A. Axial"},
        {"id": "t/3", "question": q, "answer": "B. Coronal", "prediction": "sagittal"},
        {"id": "t/4", "question": q, "answer": "C. Sagittal", "prediction": "C"},
        {"id": "t/5", "question": q, "answer": "D. Oblique", "prediction": "no idea"},
    ]
    out = choice.choice_metrics(records, {"t/2": "1", "t/3": "1", "t/4": "4", "t/5": "5"})
    assert out["n"] == 4 and out["accuracy"] == 0.5 and out["unparsed"] == 1
    assert out["by_type"] == {
        "abnormality": {"n": 1, "accuracy": 1.0},
        "plane": {"n": 2, "accuracy": 0.5},
        "position": {"n": 1, "accuracy": 0.0},
    }


def test_rec_reg_and_seg_scores() -> None:
    ref = format_box([0.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    half = format_box([0.0, 0.0, 0.0, 0.5, 0.5, 0.25])
    records = [
        {"answer": f"It is at {ref}.", "prediction": f"It is at {ref}."},
        {"answer": f"It is at {ref}.", "prediction": f"Here {half}"},
        {"answer": f"It is at {ref}.", "prediction": "no box"},
    ]
    metrics, ious = referring.rec_scores(records)
    assert ious == [1.0, 0.5, None]
    assert metrics["rec_iou"] == pytest.approx(0.5) and metrics["rec_acc@0.5"] == pytest.approx(2 / 3)
    assert metrics["rec_no_box"] == 1
    reg = [
        {"answer": "It is the left kidney.", "prediction": "The left kidney."},
        {"answer": "It is the skull.", "prediction": "It is the brain."},
        {"answer": "Something else.", "prediction": "skull"},
    ]
    assert referring.reg_name_metrics(reg) == {"reg_n_named": 2, "reg_name_acc": 0.5}
    seg = [
        {"id": "0/test/0/skull", "dice": 1.0, "iou": 1.0, "produced_seg": True},
        {"id": "0/test/1/skull", "dice": 0.5, "iou": 0.25, "produced_seg": True},
        {"id": "0/test/0/ventricles", "dice": 0.0, "iou": 0.0, "produced_seg": False},
        {"id": "0/test/0/hemorrhage", "produced_seg": True},
        {"id": "0/test/1/hemorrhage", "produced_seg": False},
    ]
    out = segmentation.seg_metrics(seg, group=lambda r: r["id"].split("/", 3)[3])
    assert out["n"] == 5 and out["n_positive"] == 3 and out["dice"] == pytest.approx(0.5)
    assert out["dice_by_class"] == {"skull": 0.75, "ventricles": 0.0}
    assert out["dice_class_mean"] == pytest.approx(0.375) and out["negative_seg_rate"] == 0.5


def test_retrieval_metrics_and_capped_pools() -> None:
    eye = torch.eye(4)
    # Text 0 and 1 swapped: pairs 0 and 1 rank their match second, 2 and 3 first.
    text = eye[[1, 0, 2, 3]] * 0.9 + eye * 0.1
    text = text / text.norm(dim=1, keepdim=True)
    metrics, i2t, t2i = retrieval.retrieval_metrics(eye, text, pools=(2, 100))
    assert i2t.tolist() == [1, 1, 0, 0] and t2i.tolist() == [1, 1, 0, 0]
    assert metrics["pool_100"]["size"] == 4 and metrics["pool_100"]["capped"]
    assert metrics["pool_100"]["i2t_R@1"] == 0.5 and metrics["pool_100"]["t2i_R@5"] == 1.0
    recalls = {
        "i2t_R@1": 0.0,
        "i2t_R@5": 1.0,
        "i2t_R@10": 1.0,
        "t2i_R@1": 0.0,
        "t2i_R@5": 1.0,
        "t2i_R@10": 1.0,
    }
    assert metrics["pool_2"] == {"size": 2, "capped": False, **recalls}


def test_parse_tasks() -> None:
    assert bench.parse_tasks("all") == list(bench.TASKS)
    assert bench.parse_tasks("8, rec,1") == ["retrieval", "rec", "refseg"]
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        bench.parse_tasks("vqa")
    with pytest.raises(ValueError, match="unknown task '9'"):
        bench.parse_tasks("9")


def test_find_data(tmp_path: Path) -> None:
    (tmp_path / "m3d" / "M3D_VQA").mkdir(parents=True)
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "qa_test.jsonl").write_text("")
    (tmp_path / "other").mkdir()
    found = bench.find_data([tmp_path / "m3d", tmp_path / "ct", tmp_path / "gone"], explicit=False)
    assert found.m3d == tmp_path / "m3d" and found.brainct == [tmp_path / "ct"]
    with pytest.raises(InputError, match="data folder not found"):
        bench.find_data([tmp_path / "gone"], explicit=True)
    with pytest.raises(InputError, match="is neither M3D-Data"):
        bench.find_data([tmp_path / "other"], explicit=True)


# -- end to end --------------------------------------------------------------------------------------
def _brainct(root: Path) -> Path:
    """A tiny `prepare` output at SHAPE: two test patients (one with a hemorrhage mask), QA and reports."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    qa, reports = [], []
    for i in range(2):
        sid = f"p{i}"
        np.save(root / "images" / f"{sid}.npy", rng.random((1, *SHAPE), dtype=np.float32))
        mask = np.zeros((1, *SHAPE), np.uint8)
        mask[:, 4:8, 8:16, 10:20] = i == 0
        np.save(root / "masks" / f"{sid}.npy", mask)
        base = {"id": sid, "image": f"images/{sid}.npy", "dataset": "physionet", "patient": sid}
        qa.append({**base, "question": "Is there a bleed?", "answer": "No hemorrhage.", "kind": "open"})
        qa.append({**base, "question": "Is there a fracture?", "answer": "No.", "kind": "closed"})
        answer = "It is [SEG]." if i == 0 else "There is no hemorrhage."
        qa.append(
            {
                **base,
                "question": "Outline the bleeding.",
                "answer": answer,
                "kind": "seg",
                "mask": f"masks/{sid}.npy",
            }
        )
        reports.append(
            {
                "id": sid,
                "image": f"images/{sid}.npy",
                "text": "No hemorrhage.",
                "split": "test",
                "dataset": "physionet",
            }
        )
    (root / "qa_test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in qa))
    (root / "reports.jsonl").write_text("".join(json.dumps(x) + "\n" for x in reports))
    return root


def _checkpoint(task, datamodule, path: Path) -> Path:
    from lightning.pytorch import Trainer

    trainer = Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=datamodule)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from m3d_lit.data.datamodules import M3DCapDataModule, M3DSegDataModule
    from m3d_lit.tasks import ClipTask, FinetuneTask

    base = tmp_path_factory.mktemp("bench")
    argv = ["--out", str(base), "--cq500", "0", "--physionet", "0", "--m3d-data", "3"]
    assert synth.main(argv + ["--m3d-shape", *map(str, SHAPE)]) == 0
    m3d = base / "M3D-Data"
    seg = M3DSegDataModule(str(m3d / "M3D_Seg_npy"), ["0000"], positioning=True, batch_size=2)
    cap = M3DCapDataModule(str(m3d), str(m3d / "M3D_Cap_npy" / "M3D_Cap.json"), batch_size=2)
    return {
        "m3d": m3d,
        "brainct": _brainct(base / "physionet"),
        "stage3": _checkpoint(built(FinetuneTask(preset="tiny", overrides=OVERRIDES)), seg, base / "stage3.ckpt"),
        "stage1": _checkpoint(built(ClipTask(preset="tiny", overrides=OVERRIDES)), cap, base / "stage1.ckpt"),
        "base": base,
    }


def _bench(setup: dict[str, Path], out: Path, *extra: str) -> int:
    argv = ["--checkpoint", str(setup["stage3"]), "--out", str(out), "--max-new-tokens", "4", *extra]
    return bench.main(argv)


@pytest.mark.slow
def test_all_eight_tasks_run(setup: dict[str, Path], tmp_path: Path) -> None:
    data = ["--data", str(setup["m3d"]), str(setup["brainct"])]
    assert _bench(setup, tmp_path, "--clip-checkpoint", str(setup["stage1"]), *data) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert list(summary["tasks"]) == list(bench.TASKS)
    assert {t: e["status"] for t, e in summary["tasks"].items()} == dict.fromkeys(bench.TASKS, "ok")
    expected_n = {"retrieval": 3, "report": 3, "vqa_closed": 5, "vqa_open": 7, "seg": 3, "refseg": 2}
    for task, n in expected_n.items():
        assert summary["tasks"][task]["n"] == n, task
    # rec/reg: one box per non-empty M3D-Seg test mask, plus the PhysioNet hemorrhage.
    assert summary["tasks"]["rec"]["datasets"] == ["m3d_seg", "physionet"]
    for task in bench.TASKS:
        lines = (tmp_path / task / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == summary["tasks"][task]["n"]
        assert json.loads((tmp_path / task / "metrics.json").read_text())
    pool = summary["tasks"]["retrieval"]["headline"]["pool_1000"]
    assert pool["size"] == 3 and pool["capped"] and pool["i2t_R@5"] == 1.0
    closed = json.loads((tmp_path / "vqa_closed" / "metrics.json").read_text())
    assert sorted(closed["by_type"]) == ["abnormality", "organ", "phase", "plane", "position"]
    assert "dice_by_class" in json.loads((tmp_path / "seg" / "metrics.json").read_text())
    report = (tmp_path / "report.md").read_text()
    assert report.count("| ok |") == 8 and "capped at 3" in report
    assert "bleu1 (m3d) " in report and "meteor (m3d) " in report and summary["setup"]["protocol"] == "m3d"
    vqa_open = json.loads((tmp_path / "vqa_open" / "metrics.json").read_text())
    assert vqa_open["protocol"] == "m3d" and vqa_open["n_text"] == 7 and "ci95" in vqa_open


@pytest.mark.slow
def test_absent_tasks_are_listed_not_failed(setup: dict[str, Path], tmp_path: Path) -> None:
    assert _bench(setup, tmp_path, "--tasks", "1,3,refseg,seg", "--data", str(setup["brainct"])) == 0
    tasks = json.loads((tmp_path / "metrics.json").read_text())["tasks"]
    assert tasks["retrieval"] == {
        "title": "image-text retrieval",
        "status": "absent",
        "reason": "no --clip-checkpoint given",
    }
    assert tasks["vqa_closed"]["status"] == "absent" and "M3D_VQA_test.csv" in tasks["vqa_closed"]["reason"]
    assert tasks["seg"]["status"] == "absent" and tasks["refseg"]["status"] == "ok"
    assert not (tmp_path / "vqa_closed").exists()
    assert "| absent |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_wrong_checkpoint_fails_that_task_and_exits_2(setup: dict[str, Path], tmp_path: Path) -> None:
    argv = ["--checkpoint", str(setup["stage1"]), "--tasks", "refseg", "--data", str(setup["brainct"])]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 2
    entry = json.loads((tmp_path / "metrics.json").read_text())["tasks"]["refseg"]
    assert entry["status"] == "failed" and "give a stage-2 or stage-3 checkpoint" in entry["reason"]
