"""`m3d-lit prepare`: outputs, skipped scans, resume after a kill, settings check, no identifying data."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from m3d_lit.commands import prepare as prepare_command
from m3d_lit.commands import synth
from m3d_lit.data import prepare
from m3d_lit.data.prepare import MANIFEST_COLUMNS, prepare_volumes, safe_id
from m3d_lit.errors import InputError

SIZE = (16, 32, 32)
IDENTIFYING = [b"SYNTH^PATIENT", b"SYNTHID", b"SYNTH GENERAL HOSPITAL", b"SYNACC", b"19400101", b"19410101"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    argv = ["--out", str(out), "--cq500", "4", "--physionet", "3", "--balanced", "--shape", "16", "64", "64"]
    assert synth.main(argv) == 0
    return out


def _run(dataset: str, root: Path, out: Path, **kw) -> prepare.PrepareResult:
    return prepare_volumes(dataset, root, out, size=SIZE, progress=False, **kw)


def _table(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_physionet_outputs(raw, tmp_path):
    result = _run("physionet", raw / "physionet", tmp_path)
    assert result.ids == ["049", "050", "051"] and result.skipped == [] and result.reused == 0
    rows = _table(tmp_path / "manifest.csv")
    assert tuple(rows[0]) == MANIFEST_COLUMNS and [r["id"] for r in rows] == result.ids
    masks_with_blood = 0
    for row in rows:
        data = (tmp_path / "images" / f"{row['id']}.npy").read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        image = np.load(tmp_path / "images" / f"{row['id']}.npy")
        mask = np.load(tmp_path / "masks" / f"{row['id']}.npy")
        assert (
            image.dtype == np.float16 and image.shape == (1, *SIZE) and 0 <= image.min() <= image.max() <= 1
        )
        assert mask.dtype == np.uint8 and mask.shape == image.shape and set(np.unique(mask)) <= {0, 1}
        masks_with_blood += bool(mask.any())
        assert row["source"] == f"ct_scans/{row['id']}.nii" and row["orig_shape"] == "16x64x64"
        assert row["orig_spacing"] == "10x3.75x3.75" and row["out_shape"] == "1x16x32x32"
    assert 0 < masks_with_blood
    assert _table(tmp_path / "skipped.csv") == []
    settings = json.loads((tmp_path / "prepare.json").read_text())
    assert settings == {"dataset": "physionet", "size": list(SIZE), "window": "brain", "dtype": "float16"}


def test_cq500_both_namings_and_the_series_rule(raw, tmp_path):
    result = _run("cq500", raw / "cq500", tmp_path, dtype="float32")
    assert result.ids == [f"CQ500-CT-{n}" for n in range(4)]
    rows = {r["id"]: r for r in _table(tmp_path / "manifest.csv")}
    assert rows["CQ500-CT-3"]["source"].startswith("CQ500CT3 CQ500CT3/Unknown Study/")
    assert all("CONTRAST" not in r["source"] or "PRE CONTRAST" in r["source"] for r in rows.values())
    assert np.load(tmp_path / "images" / "CQ500-CT-0.npy").dtype == np.float32
    assert not (tmp_path / "masks").exists()


def _break_cq500(root: Path) -> None:
    """Scan 1: a missing slice; scan 2: mixed slice sizes (every series)."""
    for series in (root / "CQ500-CT-1" / "Unknown Study").iterdir():
        (series / "CT000004.dcm").unlink()
    for series in (root / "CQ500-CT-2" / "Unknown Study").iterdir():
        ds = pydicom.dcmread(series / "CT000003.dcm")
        ds.Rows, ds.Columns, ds.PixelData = 8, 8, np.zeros((8, 8), np.uint16).tobytes()
        ds.save_as(series / "CT000003.dcm")


def test_bad_scans_are_listed_or_stop_a_strict_run(raw, tmp_path):
    root = Path(shutil.copytree(raw / "cq500", tmp_path / "cq500"))
    _break_cq500(root)
    result = _run("cq500", root, tmp_path / "out")
    assert result.ids == ["CQ500-CT-0", "CQ500-CT-3"]
    skipped = {r["id"]: r for r in _table(tmp_path / "out" / "skipped.csv")}
    assert (
        "missing slice" in skipped["CQ500-CT-1"]["reason"]
        and "mixed slice sizes" in skipped["CQ500-CT-2"]["reason"]
    )
    assert skipped["CQ500-CT-1"]["path"].startswith("CQ500-CT-1/Unknown Study/")
    with pytest.raises(InputError, match="missing slice"):
        _run("cq500", root, tmp_path / "strict", strict=True)


def test_bad_physionet_files_are_listed(raw, tmp_path):
    root = Path(shutil.copytree(raw / "physionet", tmp_path / "physionet"))
    (root / "ct_scans" / "050.nii").write_bytes((root / "ct_scans" / "050.nii").read_bytes()[:500])
    (root / "masks" / "051.nii").unlink()
    shutil.copy(root / "ct_scans" / "049.nii", root / "ct_scans" / "a..b.nii")
    shutil.copy(root / "masks" / "049.nii", root / "masks" / "a..b.nii")
    result = _run("physionet", root, tmp_path / "out")
    assert result.ids == ["049"]
    reasons = {r["id"]: r["reason"] for r in _table(tmp_path / "out" / "skipped.csv")}
    assert "cannot read NIfTI" in reasons["050"] and "no mask" in reasons["051"]
    assert "not allowed" in reasons["a..b"]
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["049.npy"]


def test_constant_nan_and_single_slice_volumes_are_listed(tmp_path):
    root = tmp_path / "physionet"
    for folder in ("ct_scans", "masks"):
        (root / folder).mkdir(parents=True)
    nan = np.zeros((16, 16, 8), np.float32)
    nan[3, 3, 3] = np.nan
    volumes = {"070": np.full((16, 16, 8), 30, np.int16), "071": np.zeros((16, 16, 1), np.int16), "072": nan}
    for pid, volume in volumes.items():
        for folder, data in (("ct_scans", volume), ("masks", np.zeros(volume.shape, np.uint8))):
            nib.save(nib.Nifti1Image(data, np.eye(4)), root / folder / f"{pid}.nii")
    result = _run("physionet", root, tmp_path / "out")
    reasons = {sid: reason for sid, _, reason in result.skipped}
    assert result.ids == [] and "constant volume" in reasons["070"]
    assert "single 2D slice" in reasons["071"] and "NaN/inf" in reasons["072"]
    with pytest.raises(InputError, match="no scan could be prepared"):
        prepare_command.main(
            ["physionet", "--root", str(root), "--out", str(tmp_path / "out"), "--size", *map(str, SIZE)]
        )


def test_safe_id():
    assert safe_id("CQ500-CT-1") == "CQ500-CT-1"
    for bad in ("../x", "a/b", "..", "a\\b", ""):
        with pytest.raises(InputError, match="not allowed"):
            safe_id(bad)


def test_killed_run_then_rerun_equals_one_clean_run(raw, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _run("physionet", raw / "physionet", clean)
    _run("physionet", raw / "physionet", killed)
    # What a kill can leave: a temp file mid-write, an image written but not yet in the manifest, and a
    # manifest row whose image was replaced since (sha mismatch).
    (killed / "images" / ".050.npy.tmp-4242").write_bytes(b"half a file")
    rows = _table(killed / "manifest.csv")
    with (killed / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[:2])
    (killed / "images" / "049.npy").unlink()
    np.save(killed / "images" / "050.npy", np.zeros((1, *SIZE), np.float16))
    result = _run("physionet", raw / "physionet", killed)
    assert result.reused == 0 and result.ids == ["049", "050", "051"]
    assert _files(killed) == _files(clean)
    assert _run("physionet", raw / "physionet", killed).reused == 3


def test_a_source_replaced_since_is_prepared_again(raw, tmp_path):
    source = tmp_path / "raw"
    shutil.copytree(raw / "physionet", source)
    first = _run("physionet", source, tmp_path / "out")
    before = np.load(tmp_path / "out" / "images" / "050.npy")
    scan = source / "ct_scans" / "050.nii"
    image = nib.load(scan)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[::-1].copy(), image.affine, image.header), scan)
    again = _run("physionet", source, tmp_path / "out")
    assert first.reused == 0 and again.reused == 2 and again.ids == first.ids
    assert not np.array_equal(np.load(tmp_path / "out" / "images" / "050.npy"), before)
    assert _run("physionet", source, tmp_path / "out").reused == 3


def test_out_folder_of_another_dataset_or_settings_is_refused(raw, tmp_path):
    _run("physionet", raw / "physionet", tmp_path)
    with pytest.raises(InputError, match="prepare.json: .* was prepared with .*'dataset': 'physionet'"):
        _run("cq500", raw / "cq500", tmp_path)
    with pytest.raises(InputError, match="prepare.json"):
        prepare_volumes("physionet", raw / "physionet", tmp_path, size=(32, 32, 32), progress=False)
    with pytest.raises(ValueError, match="not divisible"):
        prepare_volumes("physionet", raw / "physionet", tmp_path / "x", size=(16, 30, 32), progress=False)


def test_workers_give_the_same_outputs(raw, tmp_path):
    _run("physionet", raw / "physionet", tmp_path / "one")
    _run("physionet", raw / "physionet", tmp_path / "two", workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def _no_identifying_data(folder: Path) -> None:
    for name, data in _files(folder).items():
        for needle in IDENTIFYING:
            assert needle not in data, f"{needle!r} found in {name}"


def test_no_identifying_dicom_field_reaches_the_outputs(raw, tmp_path):
    root = Path(shutil.copytree(raw / "cq500", tmp_path / "cq500"))
    _break_cq500(root)  # error messages go to skipped.csv too
    assert pydicom.dcmread(next(root.rglob("CT000000.dcm"))).PatientName.family_name == "SYNTH"
    _run("cq500", root, tmp_path / "out")
    _no_identifying_data(tmp_path / "out")


def test_main_runs_prepare_then_qa(raw, tmp_path, capsys):
    pytest.importorskip("m3d_lit.data.qa", reason="m3d_lit.data.qa is not written yet")
    for dataset in ("cq500", "physionet"):
        out = tmp_path / dataset
        argv = [dataset, "--root", str(raw / dataset), "--out", str(out), "--size", *map(str, SIZE)]
        assert prepare_command.main(argv) == 0
        assert any(out.glob("qa_*.jsonl")), sorted(p.name for p in out.iterdir())
        _no_identifying_data(out)
    assert "m3d-lit prepare: 3 scans" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", ["cq500", "folder"])
def test_a_prepare_of_the_wrong_source_leaves_the_folder_free_for_the_right_one(raw, tmp_path, wrong):
    """The PhysioNet folder prepared as another source fails in one line and leaves no settings behind, so
    the right `prepare` into the same folder is not refused as "prepared with ..."."""
    out = tmp_path / "out"
    argv = ["physionet", "--root", str(raw / "physionet"), "--out", str(out), "--size", *map(str, SIZE)]
    wrong_argv = [wrong, *argv[1:]]
    if wrong == "folder":
        wrong_argv += ["--labels", str(raw / "physionet" / "hemorrhage_diagnosis_raw_ct.csv")]
    with pytest.raises(InputError):
        prepare_command.main(wrong_argv)
    assert not (out / "prepare.json").exists() and not list(out.glob("images/*"))
    assert prepare_command.main(argv) == 0
    assert json.loads((out / "prepare.json").read_text())["dataset"] == "physionet"
