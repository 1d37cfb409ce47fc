"""Volume readers: geometry, HU, orientation, mask alignment, series choice and every bad input."""

from __future__ import annotations

import gzip
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import SHARED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from m3d_lit.commands import synth
from m3d_lit.data import io, synthetic
from m3d_lit.data.preprocess import load_and_preprocess
from m3d_lit.data.sources import cq500
from m3d_lit.errors import InputError

SHAPE = (12, 32, 32)
LABELS = SHARED / "data" / "labels"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    argv = ["--out", str(out), "--cq500", "4", "--physionet", "3", "--balanced", "--shape", *map(str, SHAPE)]
    assert synth.main(argv) == 0
    return out


def _series(raw: Path, n: int) -> Path:
    scan = cq500.find_cq500_scans(raw / "cq500")[f"CQ500-CT-{n}"]
    return cq500.choose_series(scan)


def _copy_series(raw: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(_series(raw, 0), tmp_path / "series"))


def test_dicom_series_gives_the_drawn_volume(raw):
    for n in range(4):
        hu, spacing = io.read_dicom_series(_series(raw, n))
        phantom = synthetic.scan_phantom("cq500", n, SHAPE, 0, balanced=True)[0]
        # HU exact in canonical orientation; stored pixels clip at 0, i.e. at the intercept (-1000 or -1024).
        np.testing.assert_array_equal(np.maximum(hu, -1000), np.maximum(phantom.hu, -1000))
        assert spacing == pytest.approx((160 / SHAPE[0], 240 / SHAPE[1], 240 / SHAPE[2]), abs=1e-3)


def test_nifti_and_mask_are_aligned_with_the_drawn_volume(raw):
    root = raw / "physionet"
    for i, pid in enumerate(synthetic.physionet_numbers(3)):
        vol, mask, spacing = io.read_nifti_with_mask(
            root / "ct_scans" / f"{pid:03d}.nii", root / "masks" / f"{pid:03d}.nii"
        )
        phantom = synthetic.scan_phantom("physionet", i, SHAPE, 0, balanced=True)[0]
        np.testing.assert_array_equal(vol, phantom.hu)
        np.testing.assert_array_equal(mask, phantom.bleeds > 0)
        assert spacing == pytest.approx((160 / SHAPE[0], 240 / SHAPE[1], 240 / SHAPE[2]))


def test_orientation_from_the_affine(tmp_path):
    """A marker at the most right, posterior, superior voxel of a RAS-stored volume lands at D=-1, H=-1, W=0."""
    data = np.zeros((4, 5, 6), np.float32)
    data[3, 0, 5] = 1.0  # RAS+ identity axes: i=3 is most Right, j=0 most Posterior, k=5 most Superior
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), tmp_path / "ras.nii.gz")
    vol, spacing = io.read_nifti(tmp_path / "ras.nii.gz")
    assert vol.shape == (6, 5, 4) and spacing == (4.0, 3.0, 2.0)
    assert vol[5, 4, 0] == 1.0 and vol.sum() == 1.0


def test_slice_order_comes_from_positions_not_names(raw, tmp_path):
    series = _copy_series(raw, tmp_path)
    expected, _ = io.read_dicom_series(series)
    files = sorted(series.iterdir())
    names = [f.name for f in files]
    random.Random(1).shuffle(names)
    for f, name in zip(files, names):
        f.rename(series / f"tmp_{name}")
    for f in series.iterdir():
        f.rename(series / f.name[4:])
    hu, _ = io.read_dicom_series(series)
    np.testing.assert_array_equal(hu, expected)


def test_ct_small_as_a_one_slice_series(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "CT000000.dcm")
    hu, spacing = io.read_dicom_series(tmp_path)
    assert hu.shape == (1, 128, 128)
    assert (hu.min(), hu.max()) == (-896.0, 1167.0)  # stored 128..2191, intercept -1024
    assert spacing == pytest.approx((5.0, 0.661468, 0.661468))


def test_missing_slice(raw, tmp_path):
    series = _copy_series(raw, tmp_path)
    (series / "CT000005.dcm").unlink()
    with pytest.raises(InputError, match="missing slice") as err:
        io.read_dicom_series(series)
    assert str(series) in str(err.value)


def test_mixed_slice_sizes(raw, tmp_path):
    series = _copy_series(raw, tmp_path)
    ds = pydicom.dcmread(series / "CT000003.dcm")
    ds.Rows, ds.Columns = 16, 16
    ds.PixelData = np.zeros((16, 16), np.uint16).tobytes()
    ds.save_as(series / "CT000003.dcm")
    with pytest.raises(InputError, match="mixed slice sizes"):
        io.read_dicom_series(series)


def test_dicom_without_preamble(raw, tmp_path):
    series = _copy_series(raw, tmp_path)
    target = series / "CT000002.dcm"
    target.write_bytes(target.read_bytes()[132:])
    with pytest.raises(InputError, match="not a DICOM file") as err:
        io.read_dicom_series(series)
    assert err.value.path == str(target)


def test_non_ct_and_empty_folders(raw, tmp_path):
    series = _copy_series(raw, tmp_path)
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    with pytest.raises(InputError, match="modality MR, expected CT"):
        io.read_dicom_series(series)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM files"):
        io.read_dicom_series(tmp_path / "empty")


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _patched(src: Path, dst: Path, offset: int, value: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[offset : offset + len(value)] = value
    dst.write_bytes(bytes(data))
    return dst


def test_bad_nifti_files(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", np.zeros((8, 8, 4), np.int16))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    plain = tmp_path / "plain.nii"
    plain.write_bytes(gzip.decompress(good.read_bytes()))
    cases = {
        truncated: "cannot read NIfTI",
        _patched(plain, tmp_path / "magic.nii", 344, b"xx9\0"): "cannot read NIfTI",
        _patched(plain, tmp_path / "dtype.nii", 70, (999).to_bytes(2, "little")): "data code 999",
        _patched(plain, tmp_path / "dims.nii", 42, (100).to_bytes(2, "little")): "Expected 6400 bytes",
        _nifti(tmp_path / "flat.nii", np.zeros((8, 8), np.int16)): "expected a 3D volume",
        _nifti(tmp_path / "nan.nii", np.full((4, 4, 4), np.nan, np.float32)): "NaN/inf",
        _nifti(tmp_path / "inf.nii", np.where(np.eye(4)[None] > 0, np.inf, 0).astype(np.float32)): "NaN/inf",
    }
    for path, message in cases.items():
        with pytest.raises(InputError, match=message) as err:
            io.read_nifti(path)
        assert err.value.path == str(path)


def test_mask_must_share_the_image_grid(tmp_path):
    image = _nifti(tmp_path / "img.nii", np.zeros((8, 8, 4), np.int16))
    with pytest.raises(InputError, match="differs from image shape"):
        io.read_nifti_with_mask(image, _nifti(tmp_path / "m.nii", np.zeros((8, 8, 5), np.uint8)))


def test_npy_volumes(tmp_path):
    good = np.random.default_rng(0).random((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "good.npy", good)
    np.testing.assert_array_equal(io.read_npy(tmp_path / "good.npy"), good[0])
    for name, array, message in (
        ("range.npy", good * 300 - 1000, "expected \\[0, 1\\]"),
        ("flat.npy", good[0, 0], "expected a 1 x D x H x W"),
        ("nan.npy", np.full((2, 4, 4), np.nan), "NaN/inf"),
    ):
        np.save(tmp_path / name, array)
        with pytest.raises(InputError, match=message):
            io.read_npy(tmp_path / name)


def test_cq500_folder_namings_and_duplicates(tmp_path):
    assert cq500.cq500_scan_id("CQ500-CT-12") == cq500.cq500_scan_id("CQ500CT12 CQ500CT12") == "CQ500-CT-12"
    assert cq500.cq500_scan_id("CQ500CT12 CQ500CT13") is None and cq500.cq500_scan_id("notes") is None
    (tmp_path / "CQ500-CT-3").mkdir()
    (tmp_path / "CQ500CT3 CQ500CT3").mkdir()
    with pytest.raises(InputError, match="appears twice"):
        cq500.find_cq500_scans(tmp_path)


def test_series_rule_and_override(tmp_path):
    scan = tmp_path / "CQ500CT7 CQ500CT7"
    hu = np.zeros((3, 8, 8), np.int16)
    ident = {"n": 7, "seed": 0, "intercept": -1024.0}
    for name, thickness in (
        ("CT POST CONTRAST", 5.0),
        ("CT 0.625mm", 0.625),
        ("CT 5mm", 5.0),
        ("CT Thin Bone", 5.0),
    ):
        synthetic.write_ct_series(scan / "Unknown Study" / name, hu, (thickness, 1.0, 1.0), name, ident)
    assert cq500.choose_series(scan).name == "CT 5mm"  # neutral name beats contrast/bone, then thickness
    synthetic.write_ct_series(scan / "Unknown Study" / "CT PLAIN THIN", hu, (0.625, 1.0, 1.0), "x", ident)
    assert cq500.choose_series(scan).name == "CT PLAIN THIN"  # an explicit plain series first
    listing = tmp_path / "series.txt"
    listing.write_text("CQ500-CT-7/Unknown Study/CT 0.625mm\n\n")
    override = cq500.load_series_list(listing)
    assert cq500.choose_series(scan, override).name == "CT 0.625mm"
    listing.write_text("CQ500-CT-7/../../etc\n")
    with pytest.raises(InputError, match="line 1"):
        cq500.load_series_list(listing)


@pytest.mark.skipif(not (LABELS / "cq500_series_folders.txt").exists(), reason="shared labels folder absent")
def test_real_series_list_parses():
    listing = cq500.load_series_list(LABELS / "cq500_series_folders.txt")
    assert len(listing) == 488 and listing["CQ500-CT-99"] == "Unknown Study/CT PRE CONTRAST 5MM STD"


_PREFIXES = [
    b"",
    b"\x93NUMPY\x01\x00",
    b"\x1f\x8b\x08\x00",
    b"\x00" * 128 + b"DICM",
    (348).to_bytes(4, "little"),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from(_PREFIXES),
    body=st.binary(max_size=600),
    suffix=st.sampled_from([".nii", ".nii.gz", ".dcm", ".npy"]),
)
def test_random_bytes_give_only_input_errors(tmp_path, prefix, body, suffix):
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(prefix + body)
    try:
        load_and_preprocess(path, size=(4, 16, 16))
    except InputError as e:
        assert e.path == str(path) and e.problem


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=5), fill=st.sampled_from([0.0, 0.5, np.nan, -3.0])
)
def test_random_shapes_give_a_volume_or_an_input_error(tmp_path, shape, fill):
    for path in (tmp_path / "v.npy", tmp_path / "v.nii"):
        data = np.full(shape, fill, np.float32)
        np.save(path, data) if path.suffix == ".npy" else nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        try:
            out = load_and_preprocess(path, size=(4, 16, 16))
        except InputError as e:
            assert e.path == str(path)
        else:
            assert out.image.shape == (1, 4, 16, 16) and np.isfinite(out.image).all()
