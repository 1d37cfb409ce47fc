"""The synthetic CQ500 / PhysioNet generator: formats, labels vs. pixels, determinism, appearance."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import SHARED

from m3d_lit.commands import synth
from m3d_lit.data import synthetic
from m3d_lit.data.phantom import BLEED_TYPES, render_phantom
from m3d_lit.data.preprocess import apply_window
from m3d_lit.errors import InputError

LABELS = SHARED / "data" / "labels"
SHAPE = (16, 64, 64)


def _synth(out: Path, cq500: int, physionet: int, seed: int = 0, balanced: bool = False) -> Path:
    argv = ["--out", str(out), "--cq500", str(cq500), "--physionet", str(physionet), "--seed", str(seed)]
    argv += ["--shape", *map(str, SHAPE)] + (["--balanced"] if balanced else [])
    assert synth.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory.mktemp("synth"), cq500=4, physionet=3, balanced=True)


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_reads_csv_has_the_real_header_and_majority_is_truth(raw):
    text = (raw / "cq500" / "reads.csv").read_text()
    assert not text.endswith("\n")  # like the real file
    rows = list(csv.reader(text.splitlines()))
    assert tuple(rows[0]) == synthetic.CQ500_COLUMNS and len(rows[0]) == 44
    if (LABELS / "cq500_reads.csv").exists():
        assert (LABELS / "cq500_reads.csv").read_text().splitlines()[0].split(",") == rows[0]
    assert [r[0] for r in rows[1:]] == [f"CQ500-CT-{n}" for n in range(4)]
    for n, row in enumerate(rows[1:]):
        truth = synthetic.scan_phantom("cq500", n, SHAPE, 0, balanced=True)[0].truth
        votes = np.array(row[2:], dtype=int).reshape(3, 14)
        assert set(np.unique(votes)) <= {0, 1}
        majority = (votes.sum(axis=0) >= 2).astype(int)
        assert majority.tolist() == [truth[f] for f in synthetic.CQ500_FINDINGS]


def test_cq500_layout_and_dicom_headers(raw):
    folders = sorted(p.name for p in (raw / "cq500").iterdir() if p.is_dir())
    assert folders == ["CQ500-CT-0", "CQ500-CT-1", "CQ500-CT-2", "CQ500CT3 CQ500CT3"]
    series = sorted((raw / "cq500" / "CQ500-CT-0" / "Unknown Study").iterdir())
    ds = pydicom.dcmread(series[0] / "CT000000.dcm")
    assert ds.Modality == "CT" and ds.RescaleSlope == 1 and ds.RescaleIntercept in (-1024, -1000)
    assert len(ds.PixelSpacing) == 2 and float(ds.SliceThickness) == 160 / SHAPE[0]
    # Fake identifying fields are present on purpose: other tests grep outputs for them.
    assert str(ds.PatientName) == "SYNTH^PATIENT0" and ds.InstitutionName == "SYNTH GENERAL HOSPITAL"
    first, last = ds.ImagePositionPatient[2], pydicom.dcmread(series[0] / f"CT{SHAPE[0] - 1:06d}.dcm")
    assert first > last.ImagePositionPatient[2]  # file names run against the slice order


def test_physionet_csvs_match_the_masks(raw):
    root = raw / "physionet"
    data = (root / "hemorrhage_diagnosis_raw_ct.csv").read_bytes()
    assert data.count(b"\r\n") == data.count(b"\n") == 1 + 3 * SHAPE[0]
    rows = list(csv.reader(data.decode().splitlines()))
    assert rows[0] == [
        "PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal", "Subarachnoid",
        "Epidural", "Subdural", "No_Hemorrhage", "Fracture_Yes_No",
    ]  # fmt: skip
    assert sorted(p.name for p in (root / "ct_scans").iterdir()) == ["049.nii", "050.nii", "051.nii"]
    for pid in (49, 50, 51):
        mask = np.asarray(nib.load(root / "masks" / f"{pid:03d}.nii").dataobj)
        mine = [r for r in rows[1:] if r[0] == str(pid)]
        assert [int(r[1]) for r in mine] == list(range(1, SHAPE[0] + 1))
        for r in mine:
            bleed_in_slice = bool(mask[..., int(r[1]) - 1].any())
            assert int(r[7]) == int(not bleed_in_slice)
            assert max(int(v) for v in r[2:7]) == int(bleed_in_slice)
    with open(root / "Patient_demographics.csv", newline="") as f:
        demo = list(csv.reader(f))
    assert demo[0][:3] == ["Patient Number", "Age\n(years)", "Gender"]
    assert demo[1][3:8] == ["Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural"]
    assert [r[0] for r in demo[2:]] == ["49", "50", "51"]


def test_deterministic_for_a_seed(tmp_path):
    a = _digest(_synth(tmp_path / "a", 2, 2, seed=3))
    b = _digest(_synth(tmp_path / "b", 2, 2, seed=3))
    c = _digest(_synth(tmp_path / "c", 2, 2, seed=4))
    assert a == b
    assert a["physionet/ct_scans/049.nii"] != c["physionet/ct_scans/049.nii"]


def test_rerun_is_a_no_op_and_foreign_folders_are_refused(tmp_path):
    _synth(tmp_path, 1, 0)
    before = _digest(tmp_path)
    _synth(tmp_path, 1, 0)
    assert _digest(tmp_path) == before
    (tmp_path / "other" / "physionet").mkdir(parents=True)
    (tmp_path / "other" / "physionet" / "real_data.txt").write_text("not ours")
    with pytest.raises(InputError, match="not made by"):
        _synth(tmp_path / "other", 0, 1)


def test_frequencies_follow_the_real_labels_or_balance():
    def rates(kind: str) -> dict[str, float]:
        draws = [synthetic.draw_findings(np.random.default_rng([9, i]), kind) for i in range(3000)]
        keys = ("IPH", "IVH", "SDH", "EDH", "SAH")
        out = {k: np.mean([bool(d.get(k)) for d in draws]) for k in keys}
        out["ICH"] = np.mean([bool(d["sides"]) for d in draws])
        out["fracture"] = np.mean([bool(d["fractures"]) for d in draws])
        out["chronic"] = np.mean([d.get("chronic_type") is not None for d in draws])
        out["mass"] = np.mean([bool(d.get("mass_effect")) for d in draws])
        return out

    real = rates("cq500")
    assert abs(real["ICH"] - 205 / 491) < 0.03 and abs(real["fracture"] - 39 / 491) < 0.02
    assert real["IPH"] > real["SAH"] > real["IVH"] > real["EDH"] and real["chronic"] < 0.06
    physio = rates("physionet")
    assert abs(physio["ICH"] - 36 / 75) < 0.03 and physio["EDH"] > physio["IPH"] > physio["SDH"]
    assert all(0.3 < v < 0.85 for v in rates("balanced").values())


def test_balanced_physionet_has_no_chronic_bleed_its_labels_could_not_name():
    def chronic(dataset: str) -> float:
        phantoms = [synthetic.scan_phantom(dataset, i, (8, 32, 32), 0, balanced=True)[0] for i in range(60)]
        return np.mean([p.truth["ChronicBleed"] for p in phantoms])

    assert chronic("physionet") == 0 and chronic("cq500") > 0.2


def _draw(**kw) -> dict:
    return {"sides": {}, "fractures": [], "lesion_side": 1, **kw}


def _render(draw: dict, seed: int = 0):
    return render_phantom((32, 64, 64), draw, np.random.default_rng(seed))


def test_tissue_values_and_acute_vs_chronic_contrast():
    normal = _render(_draw())
    hu = normal.hu
    assert np.median(hu[:, 0, :]) == pytest.approx(-1000, abs=20)  # air
    assert hu.max() > 950 and abs(np.median(hu[16, 28:36, 20:26]) - 30) < 12  # bone, white matter
    acute = _render(_draw(IPH=True, sides={"IPH": 1}))
    chronic = _render(_draw(SDH=True, sides={"SDH": -1}, chronic_type="SDH"))
    for p, low, high in ((acute, 0.35, 0.6), (chronic, -0.35, -0.15)):
        img, blood = apply_window(p.hu.astype(np.float32)), p.bleeds > 0
        brain = (p.hu > 20) & (p.hu < 45) & ~blood
        assert low < img[blood].mean() - img[brain].mean() < high
    assert acute.truth["ChronicBleed"] == 0 and chronic.truth["ChronicBleed"] == 1


@pytest.mark.parametrize("seed", range(3))
def test_a_chronic_collection_is_larger_and_acute_blood_does_not_cover_it(seed):
    # Acute subarachnoid and epidural blood on the same side overlap a subdural's band. The chronic
    # subdural is drawn last and 1.3x thicker; the acute one loses what the others paint over it.
    same_side = dict(SDH=True, SAH=True, EDH=True, sides={"SDH": 1, "SAH": 1, "EDH": 1})
    sdh = BLEED_TYPES.index("SDH") + 1
    acute = _render(_draw(**same_side), seed)
    chronic = _render(_draw(**same_side, chronic_type="SDH"), seed)
    assert (chronic.bleeds == sdh).sum() > 1.3 * (acute.bleeds == sdh).sum()
    # every voxel of the chronic collection keeps chronic density: 8-14 HU painted, noise sd 5 HU
    assert chronic.hu[chronic.bleeds == sdh].max() < 45 < acute.hu[acute.bleeds == sdh].min() + 20
    # the labels say what is left to see: an epidural inside the chronic band is no longer there
    assert chronic.truth["ChronicBleed"] == 1
    for name in ("SAH", "EDH"):
        assert chronic.truth[name] == int((chronic.bleeds == BLEED_TYPES.index(name) + 1).any())


@pytest.mark.parametrize("kind", ["IPH", "SDH", "EDH", "SAH", "IVH"])
def test_bleeds_are_large_and_on_their_side(kind):
    p = _render(_draw(**{kind: True}, sides={kind: 1}))
    cols = np.nonzero((p.bleeds > 0).any(axis=(0, 1)))[0]
    head = np.nonzero((p.hu > -500).any(axis=(0, 1)))[0]
    width = (cols.max() - cols.min() + 1) / (head.max() - head.min() + 1)
    assert width > 0.12, f"{kind} spans only {width:.0%} of the head width"
    assert p.truth[kind] == 1 and p.truth["BleedLocation-Left"] == 1
    if kind != "IVH":  # blood in the ventricles reaches across the midline
        assert cols.min() >= 32 and p.truth["BleedLocation-Right"] == 0


def test_fracture_is_a_wide_gap_over_many_slices():
    p = _render(_draw(fractures=["calvarial"], fracture_side=-1))
    slices = np.nonzero(p.fracture.any(axis=(1, 2)))[0]
    assert len(slices) >= 10 and p.truth["CalvarialFracture"] == 1 and p.truth["OtherFracture"] == 0
    assert np.nonzero(p.fracture.any(axis=(0, 1)))[0].max() < 32  # patient right
    # The gap runs through the bone, so its width is its extent along the skull.
    widths = [max(np.count_nonzero(p.fracture[z].any(axis=a)) for a in (0, 1)) for z in slices]
    assert np.median(widths) >= 4


@pytest.mark.parametrize("kind, slices", [("calvarial", slice(12, 32)), ("base", slice(0, 9))])
def test_fracture_pushes_bone_in_and_swells_the_scalp_over_it(kind, slices):
    plain = _render(_draw())
    broken = _render(_draw(fractures=[kind], fracture_side=1))
    pushed = (broken.hu > 500) & (plain.hu < 100)  # bone where the plain head has brain
    swollen = (broken.hu > -500) & (plain.hu <= -500)  # soft tissue where the plain head has air
    outside = np.ones(32, bool)
    outside[slices] = False
    for changed in (pushed, swollen):
        assert np.count_nonzero(changed[slices]) >= 40 and not changed[outside].any()
        assert np.nonzero(changed.any(axis=(0, 1)))[0].min() >= 32  # over the fracture, on the patient's left
    assert 45 < np.median(broken.hu[swollen]) < 70  # swollen soft tissue, not bone
    assert broken.truth["Fracture"] == 1 and broken.truth["ICH"] == 0  # no bleed label for either


def test_pushed_in_bone_takes_the_place_of_the_blood_beneath():
    alone = _render(_draw(EDH=True, sides={"EDH": 1}))
    p = _render(_draw(EDH=True, sides={"EDH": 1}, fractures=["calvarial"], fracture_side=1))
    covered = (alone.bleeds > 0) & (p.hu > 500)
    assert covered.any() and not p.bleeds[covered].any() and p.truth["EDH"] == 1


def test_midline_shift_moves_ventricles_away_from_the_lesion():
    def ventricle_center(p) -> float:
        csf = (p.hu[14:20, 20:44, 16:48] < 15) & (p.hu[14:20, 20:44, 16:48] > -10)
        return float(np.nonzero(csf)[2].mean())

    lesion = {"SDH": True, "sides": {"SDH": 1}, "lesion_side": 1, "mass_effect": True}
    still = ventricle_center(_render(_draw(**lesion)))
    shifted = _render(_draw(**lesion, shift=True))
    assert shifted.truth["MidlineShift"] == 1 and shifted.truth["MassEffect"] == 1
    assert still - ventricle_center(shifted) >= 4  # towards the patient's right, away from the left SDH
