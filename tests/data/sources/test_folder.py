"""The folder source (`m3d-lit prepare folder`): the user's own scans end to end, every bad input named
with its file and line, and masks that lie over the scan they were drawn on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import LAMED, REPO

from m3d_lit.cli import main
from m3d_lit.data.geometry import manifest_geometry
from m3d_lit.data.prepare import prepare_volumes
from m3d_lit.data.qa import write_qa
from m3d_lit.data.sources import get_source
from m3d_lit.data.sources.folder import read_findings
from m3d_lit.data.synthetic import _nifti, _spacing, _stored_like, write_ct_series
from m3d_lit.errors import InputError

FINDINGS = """\
open_question: What does this scan show?
findings:
  bleed:
    question: Is there a bleed?
    yes: Yes, there is a bleed.
    no: No, there is no bleed.
  fracture:
    question: Is there a fracture?
"""
SOURCE = get_source("folder")


def _example(tmp_path: Path, rows: str, findings: str = FINDINGS, scans=("a", "b")) -> dict[str, Path]:
    """Files for the scan listing only: empty scans (never read), labels.csv and findings.yaml."""
    (tmp_path / "scans").mkdir(exist_ok=True)
    for sid in scans:
        (tmp_path / "scans" / f"{sid}.nii.gz").touch()
    (tmp_path / "labels.csv").write_text(rows)
    (tmp_path / "findings.yaml").write_text(findings)
    return {
        "root": tmp_path / "scans",
        "labels": tmp_path / "labels.csv",
        "findings": tmp_path / "findings.yaml",
    }


def _list(files: dict[str, Path], **extra):
    options = {"labels": files["labels"], "findings": files["findings"], **extra}
    return SOURCE.list_scans(files["root"], options)


GOOD = "id,bleed,bleed_side,fracture\na,1,left,0\nb,0,,1\n"


def test_good_listing_and_records(tmp_path: Path) -> None:
    files = _example(tmp_path, GOOD)
    refs, skipped = _list(files)
    assert [r.sid for r in refs] == ["a", "b"] and skipped == []
    _, records = SOURCE.load_labels(files["root"], files)
    samples = SOURCE.build_samples("a", records["a"])
    assert [(s["kind"], s["answer"]) for s in samples] == [
        ("open", "Bleed on the left side."),
        ("closed", "Yes, there is a bleed."),
        ("closed", "No."),
    ]
    assert (
        samples[0]["question"] == "What does this scan show?"
        and samples[2]["question"] == "Is there a fracture?"
    )
    assert SOURCE.build_samples("b", records["b"])[0]["answer"] == "Fracture."


@pytest.mark.parametrize(
    ("rows", "scans", "message"),
    [
        (GOOD + "ghost,0,,0\n", ("a", "b"), r"labels\.csv: line 4: unknown id 'ghost': no ghost\.nii"),
        (GOOD, ("a", "b", "c"), r"scans/c\.nii\.gz: scan 'c' has no row in .*labels\.csv"),
        ("id,bleed,bleed_side,fracture\na,1,left,0\nb,2,,1\n", ("a", "b"), r"labels\.csv: line 3, column bleed: value '2' is not 0 or 1"),
        ("id,bleed,fracture,edema\na,1,0,0\nb,0,1,0\n", ("a", "b"), r"labels\.csv: line 1: column 'edema' is not a finding of findings\.yaml"),
        ("id,bleed\na,1\nb,0\n", ("a", "b"), r"findings\.yaml: line 7: finding 'fracture' has no column in labels\.csv"),
        ("id,bleed,bleed_side,fracture\na,1,up,0\nb,0,,1\n", ("a", "b"), r"labels\.csv: line 2, column bleed_side: 'up' is not one of"),
        ("id,bleed,bleed_side,fracture\na,0,left,0\nb,0,,1\n", ("a", "b"), r"labels\.csv: line 2, column bleed_side: a side for a finding marked 0"),
        ("id,bleed,fracture\na,1,0\na,0,1\n", ("a",), r"labels\.csv: line 3: id 'a' appears twice \(first on line 2\)"),
        ("id,bleed,fracture\na,1\n", ("a",), r"labels\.csv: line 2: 2 values, the header has 3"),
        ("name,bleed,fracture\na,1,0\n", ("a",), r"labels\.csv: line 1: the first column must be 'id'"),
    ],
    ids=["unknown-id", "scan-without-row", "not-binary", "finding-not-in-yaml", "yaml-finding-not-in-csv",
         "bad-side", "side-of-absent-finding", "duplicate-id", "short-row", "no-id-column"],
)  # fmt: skip
def test_bad_labels_name_file_and_line(tmp_path: Path, rows: str, scans: tuple, message: str) -> None:
    files = _example(tmp_path, rows, scans=scans)
    with pytest.raises(InputError, match=message):
        _list(files)


@pytest.mark.parametrize(
    ("findings", "message"),
    [
        ("findings:\n  bleed:\n    question: Is there a bleed?\n    yes: Sure.\n", r"line 2: bleed\.yes 'Sure\.' must start with Yes"),
        ("findings:\n  bleed:\n    question: Is there a bleed?\n    no: Yes it is absent.\n", r"line 2: bleed\.no .* must start with No"),
        ("findings:\n  bleed:\n    yes: Yes.\n", r"line 2: finding 'bleed' has no 'question:'"),
        ("findings:\n  bleed:\n    question: Is there?\n    colour: red\n", r"line 2: finding 'bleed': unknown key 'colour'"),
        ("findings:\n  bleed: {question: 'Is there?'}\nextra: 1\n", r"line 3: unknown key 'extra'"),
        ("findings:\n  bleed: [question\n", r"line \d+: not valid YAML"),
        ("open_question: What?\n", r"expected a top-level 'findings:'"),
        ("findings:\n  bleed_side: {question: 'Is there?'}\n", r"line 2: finding name 'bleed_side'"),
        ("findings:\n  bleed: {question: 'A?'}\n  bleed: {question: 'B?'}\n", r"line 3: 'bleed' given twice \(first on line 2\)"),
    ],
    ids=["yes-not-yes", "no-not-no", "no-question", "unknown-finding-key", "unknown-top-key", "syntax", "no-findings", "bad-name", "twice"],
)  # fmt: skip
def test_bad_findings_yaml_names_file_and_line(tmp_path: Path, findings: str, message: str) -> None:
    path = tmp_path / "findings.yaml"
    path.write_text(findings)
    with pytest.raises(InputError, match=r"findings\.yaml: " + message):
        read_findings(path)


def test_yes_and_no_words_stay_text_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "findings.yaml"
    path.write_text("findings:\n  bleed:\n    question: Is there a bleed?\n    yes: Yes\n    no: No\n")
    (bleed,) = read_findings(path).findings
    assert (bleed.yes, bleed.no) == ("Yes", "No")


def test_source_options_are_checked(tmp_path: Path) -> None:
    files = _example(tmp_path, GOOD)
    with pytest.raises(InputError, match="labels: folder needs it"):
        prepare_volumes("folder", files["root"], tmp_path / "out", size=(8, 32, 32), progress=False)
    with pytest.raises(InputError, match="labels: applies to folder only"):
        prepare_volumes("cq500", files["root"], tmp_path / "out", options={"labels": files["labels"]})
    options = {"labels": files["labels"], "findings": files["findings"]}
    with pytest.raises(InputError, match="series_list: applies to cq500 only"):
        prepare_volumes("folder", files["root"], tmp_path / "out", series_list="x", options=options)


# ---------------------------------------------------------------- real volumes


def _volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A canonical 8 x 32 x 32 HU volume that is all 'head' (so the crop is the whole volume and prepare
    resizes nothing at --size 8 32 32) and a blocky mask."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(0, 80, (8, 32, 32)).astype(np.int16)
    mask = np.zeros(hu.shape, np.uint8)
    mask[2:6, 4 + seed : 12 + seed, 20:29] = 1
    return hu, mask


def _own_scans(tmp_path: Path) -> dict[str, Path]:
    """Three scans, one per way of storing them: NIfTI in the LPS-like layout, NIfTI with permuted axes,
    and a DICOM series; each with its mask on its own grid."""
    scans, masks = tmp_path / "scans", tmp_path / "masks"
    scans.mkdir()
    masks.mkdir()
    spacing = _spacing((8, 32, 32))
    hu, mask = _volume(0)
    nib.save(_nifti(hu, spacing), scans / "nifti.nii.gz")
    nib.save(_nifti(mask, spacing), masks / "nifti.nii.gz")
    hu, mask = _volume(1)
    affine = np.zeros((4, 4))
    affine[:3, :3] = [[-3.0, 0, 0], [0, 0, -2.0], [0, 20.0, 0]]  # i -> left, j -> superior, k -> posterior
    affine[3, 3] = 1.0
    nib.save(nib.Nifti1Image(_stored_like(hu, affine), affine), scans / "permuted.nii")
    nib.save(nib.Nifti1Image(_stored_like(mask, affine), affine), masks / "permuted.nii")
    hu, mask = _volume(2)
    write_ct_series(scans / "dicom", hu, spacing, "CT Plain", {"n": 2, "seed": 0, "intercept": -1024.0})
    from m3d_lit.data.io import read_dicom_scan

    scan = read_dicom_scan(scans / "dicom")
    nib.save(nib.Nifti1Image(_stored_like(mask, scan.affine), scan.affine), masks / "dicom.nii.gz")
    (tmp_path / "labels.csv").write_text(
        "id,bleed,bleed_side,fracture\nnifti,1,right,0\npermuted,1,,1\ndicom,1,both,0\n"
    )
    (tmp_path / "findings.yaml").write_text(FINDINGS)
    return {"labels": tmp_path / "labels.csv", "findings": tmp_path / "findings.yaml", "masks": masks}


def test_masks_lie_over_the_scan_they_were_drawn_on(tmp_path: Path) -> None:
    options = _own_scans(tmp_path)
    out = tmp_path / "out"
    result = prepare_volumes(
        "folder", tmp_path / "scans", out, size=(8, 32, 32), progress=False, options=options
    )
    assert result.ids == ["dicom", "nifti", "permuted"] and result.skipped == []
    write_qa("folder", tmp_path / "scans", out, result.ids, fractions=(1, 0, 0), options=options)
    seg = [json.loads(line) for line in (out / "qa_train.jsonl").read_text().splitlines()]
    seg = {s["id"]: s for s in seg if s["kind"] == "seg"}
    assert sorted(seg) == result.ids and all(s["answer"] == "It is [SEG]." for s in seg.values())
    for sid, sample in seg.items():
        grid = np.load(out / sample["mask"])[0]
        geometry = manifest_geometry(out / sample["image"])
        truth = np.asarray(nib.load(next(options["masks"].glob(f"{sid}.nii*"))).dataobj)
        assert grid.any() and geometry.shape == truth.shape
        np.testing.assert_array_equal(geometry.to_source(grid.astype(np.float32)), truth)


def test_unreadable_scan_and_mask_off_the_grid_are_named(tmp_path: Path) -> None:
    options = _own_scans(tmp_path)
    (tmp_path / "scans" / "nifti.nii.gz").write_bytes(b"not a nifti")
    permuted = nib.load(options["masks"] / "permuted.nii", mmap=False)
    nib.save(
        nib.Nifti1Image(np.asarray(permuted.dataobj)[:, :-1], permuted.affine),
        options["masks"] / "permuted.nii",
    )
    result = prepare_volumes(
        "folder", tmp_path / "scans", tmp_path / "out", size=(8, 32, 32), progress=False, options=options
    )
    assert result.ids == ["dicom"]
    reasons = {sid: (path, reason) for sid, path, reason in result.skipped}
    assert reasons["nifti"][0] == "nifti.nii.gz" and reasons["nifti"][1].startswith("cannot read NIfTI")
    assert reasons["permuted"][0].endswith("masks/permuted.nii") and "mask shape" in reasons["permuted"][1]
    with pytest.raises(InputError, match=r"scans/nifti\.nii\.gz: cannot read NIfTI"):
        prepare_volumes("folder", tmp_path / "scans", tmp_path / "strict", size=(8, 32, 32), progress=False,
                        strict=True, options=options)  # fmt: skip


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`m3d-lit synth --folder 8` prepared by `m3d-lit prepare folder` at 8 x 16 x 16 (the tiny test model)."""
    raw = tmp_path_factory.mktemp("folder") / "raw"
    assert main(["synth", "--out", str(raw), "--cq500", "0", "--physionet", "0", "--folder", "8",
                 "--shape", "16", "64", "64", "--balanced"]) == 0  # fmt: skip
    example = raw / "folder"
    assert sorted(p.name for p in example.iterdir()) == [
        "findings.yaml",
        "labels.csv",
        "masks",
        "scans",
        "synth.json",
    ]
    out = raw.parent / "data" / "folder"
    argv = ["prepare", "folder", "--root", str(example / "scans"), "--labels", str(example / "labels.csv"),
            "--findings", str(example / "findings.yaml"), "--masks", str(example / "masks"), "--out", str(out),
            "--size", "8", "16", "16", "--fractions", "0.5", "0", "0.5"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_prepared_layout_matches_the_other_sources(folder_data: Path) -> None:
    names = {p.name for p in folder_data.iterdir()}
    assert {"images", "masks", "manifest.csv", "skipped.csv", "prepare.json", "splits.json", "reports.jsonl",
            "qa_train.jsonl", "qa_val.jsonl", "qa_test.jsonl"} <= names  # fmt: skip
    with (folder_data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and all(r["geometry"] for r in rows)
    assert {r["source"] for r in rows} >= {"case003", "case000.nii.gz"}  # a DICOM folder and a NIfTI file
    test = [json.loads(line) for line in (folder_data / "qa_test.jsonl").read_text().splitlines()]
    per_scan = {}
    for sample in test:
        per_scan.setdefault(sample["id"], []).append(sample["kind"])
    assert all(kinds == ["open", "closed", "closed", "closed", "seg"] for kinds in per_scan.values())


@pytest.mark.slow
def test_folder_source_trains_stage3_and_evaluates(folder_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [
        "fit", "-c", str(REPO / "stages/stage3_finetune.yaml"), "-c", str(REPO / "stages/trainer/cpu.yaml"),
        "--data", str(REPO / "datamodules/folder.yaml"), "--data.roots", json.dumps([str(folder_data)]),
        "--data.num_workers", "0", "--data.batch_size", "4",
        "--model.preset", "tiny", "--model.overrides", json.dumps(LAMED), "--model.init_from", "null",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert main(argv) == 0
    checkpoint = tmp_path / "runs" / "stage3"  # the stage's latest run: the one just trained
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(folder_data / "qa_test.jsonl"),
            "--out", str(tmp_path / "eval"), "--max-new-tokens", "4", "--bootstrap", "10", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    closed = metrics["by_dataset"]["folder"]["closed"]
    findings = {"hemorrhage", "fracture", "mass_effect"}  # one closed score per finding of findings.yaml
    assert set(closed) == findings | {"pooled"}
    assert all(0.0 <= closed[f]["balanced_accuracy"] <= 1.0 and closed[f]["n"] >= 1 for f in findings)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| Folder: fracture |" in report and "| Folder: mass_effect |" in report
    # the user's own data: no paper caption, no published row or column (nothing was published on it)
    assert "## Question answering: text metrics" in report and "No published figures were measured on Folder" in report
    assert "Table 1" not in report and "Published" not in report and "| published |" not in report
