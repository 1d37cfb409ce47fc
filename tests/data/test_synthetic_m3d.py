"""`m3d-lit synth --m3d-data`: M3D-Cap/VQA/Seg formats, masks vs. the phantom, every DataModule reads them,
and the positioning rows the DataModules add from masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_prepared

from m3d_lit.boxes import mask_to_box, parse_boxes
from m3d_lit.commands import synth
from m3d_lit.data import synthetic_m3d
from m3d_lit.data.datamodules import (
    BrainCTQADataModule,
    M3DCapDataModule,
    M3DSegDataModule,
    M3DVQADataModule,
)

SHAPE = (16, 32, 32)
COUNT = 5


def _synth(out: Path, seed: int = 0) -> Path:
    argv = ["--out", str(out), "--cq500", "0", "--physionet", "0", "--m3d-data", str(COUNT)]
    assert synth.main(argv + ["--m3d-shape", *map(str, SHAPE), "--seed", str(seed), "--balanced"]) == 0
    return out / "M3D-Data"


@pytest.fixture(scope="module")
def m3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synth(tmp_path_factory.mktemp("m3d"))


def test_layout_splits_and_volumes(m3d: Path) -> None:
    cap = json.loads((m3d / "M3D_Cap_npy" / "M3D_Cap.json").read_text())
    assert {k: len(v) for k, v in cap.items()} == {"train": 3, "validation": 1, "test": 1}
    item = cap["test"][0]
    image = np.load(m3d / item["image"])
    assert image.shape == (1, *SHAPE) and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    assert (m3d / item["text"]).read_text().strip()
    seg = json.loads((m3d / "M3D_Seg_npy" / "0000" / "0000.json").read_text())
    assert seg["labels"] == {"1": "skull", "2": "ventricles", "3": "hemorrhage"}
    assert len(seg["train"]) + len(seg["validation"]) + len(seg["test"]) == COUNT
    case = seg["test"][0]
    assert [Path(p).name for p in case["label"]] == [
        "mask_skull.npy",
        "mask_ventricles.npy",
        "mask_hemorrhage.npy",
    ]
    masks = {Path(p).stem[5:]: np.load(m3d / "M3D_Seg_npy" / p) for p in case["label"]}
    for mask in masks.values():
        assert mask.shape == (1, *SHAPE) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert masks["skull"].any() and masks["ventricles"].any()
    assert not (masks["skull"] & masks["ventricles"]).any()


def test_masks_match_the_phantom() -> None:
    phantom = synthetic_m3d._scan(0, (32, 64, 64), seed=3, balanced=True)
    masks = synthetic_m3d.structure_masks(phantom)
    assert np.array_equal(masks["hemorrhage"][0], phantom.bleeds > 0)
    assert np.array_equal(masks["skull"][0], phantom.hu >= 500)
    vent = masks["ventricles"][0].astype(bool)
    # Ventricles: CSF-dark, central, clear of the skull, a small share of the head.
    assert np.median(phantom.hu[vent]) < 20 or (phantom.bleeds[vent] == 2).mean() > 0.5
    box = mask_to_box(vent)
    assert 0.3 < (box[0] + box[3]) / 2 < 0.7 and 0.3 < (box[1] + box[4]) / 2 < 0.7
    assert 0.002 < vent.mean() < 0.05


def test_vqa_rows_have_four_choices_five_types_and_one_true_answer(m3d: Path) -> None:
    with (m3d / "M3D_VQA" / "M3D_VQA_train.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(synthetic_m3d.VQA_HEADER)
    assert len(rows) == 3 * 5
    assert sorted({r["Question Type"] for r in rows}) == ["1", "2", "3", "4", "5"]
    for row in rows:
        choices = [row[f"Choice {c}"] for c in "ABCD"]
        assert len(set(choices)) == 4
        assert row[f"Choice {row['Answer Choice']}"] == row["Answer"]
        assert row["Image Path"].startswith("M3D_Cap_npy/") and (m3d / row["Image Path"]).is_file()


def test_abnormality_distractors_are_never_true() -> None:
    import random

    truth = {"IPH": 1, "SDH": 1, "EDH": 1, "IVH": 1, "SAH": 1, "Fracture": 1, "BleedLocation-Left": 1}
    rows = synthetic_m3d.vqa_rows("x.npy", "text", truth, random.Random(0))
    abnormality = next(r for r in rows if r[2] == "4")
    choices, answer = abnormality[4:8], abnormality[8]
    assert answer == "Intraparenchymal hemorrhage"
    wrong = [c for c in choices if c != answer]
    assert not {"Subdural hemorrhage", "Skull fracture", "Epidural hemorrhage"} & set(wrong)


def test_deterministic_and_reused(tmp_path: Path, m3d: Path) -> None:
    again = _synth(tmp_path / "a")
    for rel in ("M3D_Cap_npy/ct_case/000000/image.npy", "M3D_Seg_npy/0000/case_00000/mask_ventricles.npy"):
        assert np.array_equal(np.load(again / rel), np.load(m3d / rel))
    stamp = (again / "M3D_Cap_npy" / "M3D_Cap.json").stat().st_mtime_ns
    _synth(tmp_path / "a")  # same settings: the folder is kept as it is
    assert (again / "M3D_Cap_npy" / "M3D_Cap.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="need N >= 3"):
        synth.main(["--out", str(tmp_path / "b"), "--cq500", "0", "--physionet", "0", "--m3d-data", "2"])


def test_every_m3d_datamodule_reads_it(m3d: Path) -> None:
    cap = M3DCapDataModule(str(m3d), str(m3d / "M3D_Cap_npy" / "M3D_Cap.json"))
    vqa = M3DVQADataModule(
        str(m3d), *(str(m3d / "M3D_VQA" / f"M3D_VQA_{s}.csv") for s in ("train", "val", "test"))
    )
    seg = M3DSegDataModule(str(m3d / "M3D_Seg_npy"), ["0000"], val_split="validation")
    for module in (cap, vqa, seg):
        module.setup("fit")
        module.setup("test")
        for split in ("train", "val", "test"):
            item = module.datasets[split][0]
            assert item["image"].shape == (1, *SHAPE) and item["answer"]
    assert vqa.datasets["test"][0]["answer"][:3] in ("A. ", "B. ", "C. ", "D. ")
    assert (
        cap.datasets["test"][0]["answer"] == (m3d / "M3D_Cap_npy/ct_case/000000/text.txt").read_text().strip()
    )


def test_seg_positioning_rows(m3d: Path) -> None:
    plain = M3DSegDataModule(str(m3d / "M3D_Seg_npy"), ["0000"]).read_split("test")
    module = M3DSegDataModule(str(m3d / "M3D_Seg_npy"), ["0000"], positioning=True)
    rows = module.read_split("test")
    extra = rows[len(plain) :]
    assert rows[: len(plain)] == plain
    masks = {r.id: np.load(r.mask) for r in plain}
    non_empty = [rid for rid, mask in masks.items() if mask.any()]
    assert sorted(r.id for r in extra) == sorted(
        [f"{i}/rec" for i in non_empty] + [f"{i}/reg" for i in non_empty]
    )
    skull = next(r for r in extra if r.id.endswith("skull/rec"))
    box = parse_boxes(skull.answer[0])[0]
    expected = mask_to_box(masks[skull.id.removesuffix("/rec")])
    # the answer prints three decimals, which round by at most half a step (float64 parsing adds ~1e-16)
    np.testing.assert_allclose(box, expected, atol=0.5e-3 + 1e-12, rtol=0)
    assert skull.question[0] == "Where is the skull in this image? Please output the bounding box."
    reg = next(r for r in extra if r.id.endswith("skull/reg"))
    assert reg.answer[0] == "It is the skull." and parse_boxes(reg.question[0])[0] == box
    module.setup("test")
    item = module.datasets["test"][len(plain)]
    assert item["kind"] in ("rec", "reg") and item["mask"] is None


def test_brainct_positioning_rows(tmp_path: Path) -> None:
    root = write_prepared(tmp_path / "physionet", "physionet")
    rows = BrainCTQADataModule([str(root)], positioning=True).read_split("test")
    extra = [r for r in rows if r.kind in ("rec", "reg")]
    # One patient of the two has a non-empty hemorrhage mask.
    assert [r.kind for r in extra] == ["rec", "reg"]
    assert "hemorrhage" in extra[0].question[0] and parse_boxes(extra[0].answer[0])
    assert extra[1].answer[0] == "It is the hemorrhage."
    with pytest.raises(ValueError, match="positioning needs mode 'qa'"):
        BrainCTQADataModule([str(root)], mode="report", positioning=True)
