"""Preprocessing: windows, min-max, crop to the head, resize, masks, and the single-scan entry point."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from m3d_lit.commands import synth
from m3d_lit.data.preprocess import (
    apply_window,
    check_size,
    foreground_box,
    load_and_preprocess,
    minmax,
    preprocess,
    preprocess_with_box,
    resize,
)
from m3d_lit.errors import InputError


def test_brain_window_then_minmax():
    hu = np.array([-1000, 0, 40, 80, 1000], np.float32)
    np.testing.assert_allclose(apply_window(hu, "brain"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(apply_window(hu, "none"), (hu + 1000) / 2000)
    with pytest.raises(ValueError, match="unknown window 'lung'"):
        apply_window(hu, "lung")


@pytest.mark.parametrize("window", ["brain", "none", "bone"])
def test_constant_volume_gives_zeros(window):
    out = preprocess(np.full((4, 8, 8), 35.0, np.float32), size=(4, 16, 16), window=window)
    assert out.shape == (1, 4, 16, 16) and not out.any() and np.isfinite(out).all()
    assert not minmax(np.full((3,), 7.0)).any()


def test_non_finite_and_2d_volumes_are_input_errors():
    hu = np.zeros((4, 8, 8), np.float32)
    hu[1, 2, 3] = np.inf
    with pytest.raises(InputError, match="scan.nii: volume holds 1 NaN/inf"):
        preprocess(hu, size=(4, 16, 16), source="scan.nii")
    with pytest.raises(InputError, match="expected a 3D volume"):
        preprocess(np.zeros((8, 8), np.float32), size=(4, 16, 16))


def test_size_must_be_divisible_by_the_patch():
    assert check_size([32, 256, 256]) == (32, 256, 256)
    with pytest.raises(
        ValueError, match=r"size: \(32, 250, 256\) is not divisible by the patch size \(4, 16, 16\)"
    ):
        check_size((32, 250, 256))
    with pytest.raises(ValueError, match="3 positive integers"):
        check_size((32, 256))


def test_crop_to_the_head_is_square_in_plane():
    hu = np.full((6, 40, 50), -1000.0, np.float32)
    hu[1:5, 10:30, 20:32] = 40.0  # a 20 x 12 head off-centre
    box = foreground_box(hu)
    assert box[0] == slice(1, 5) and box[1] == slice(10, 30)
    assert box[2].stop - box[2].start == 20 and box[2].start <= 20 and box[2].stop >= 32
    assert foreground_box(np.full((2, 3, 3), -1000.0)) == (slice(None),) * 3


def test_resize_keeps_masks_binary_and_aligned():
    mask = np.zeros((8, 32, 32), np.uint8)
    mask[2:6, 8:20, 12:28] = 1
    small = resize(mask, (4, 16, 16), mask=True)
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 1}
    assert small[1:3, 4:10, 6:14].all() and small.sum() == 2 * 6 * 8
    image = resize(mask.astype(np.float32), (4, 16, 16))
    assert image.dtype == np.float32 and image.shape == (4, 16, 16)


def test_mask_follows_the_image_through_crop_and_resize():
    hu = np.full((8, 48, 48), -1000.0, np.float32)
    hu[:, 8:40, 4:44] = 30.0
    hu[2:6, 20:28, 30:38] = 70.0  # a bleed
    image, mask, _ = preprocess_with_box(hu, (hu == 70).astype(np.uint8), size=(4, 32, 32))
    bright = image[0] > 0.75
    assert mask.shape == image.shape and (mask[0].astype(bool) == bright).mean() > 0.98


def test_npy_passes_through_unchanged(tmp_path):
    volume = np.random.default_rng(0).random((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "v.npy", volume)
    same = load_and_preprocess(tmp_path / "v.npy", size=(4, 16, 16))
    np.testing.assert_array_equal(same.image, volume)
    assert same.mask is None and same.orig_shape == (4, 16, 16)
    assert load_and_preprocess(tmp_path / "v.npy", size=(8, 32, 32)).image.shape == (1, 8, 32, 32)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    assert synth.main(["--out", str(out), "--cq500", "1", "--physionet", "2", "--balanced",
                           "--shape", "16", "64", "64"]) == 0  # fmt: skip
    return out


def test_load_and_preprocess_dicom_and_nifti(raw):
    cq = load_and_preprocess(raw / "cq500" / "CQ500-CT-0", size=(16, 32, 32))
    assert cq.image.shape == (1, 16, 32, 32) and cq.orig_shape == (16, 64, 64)
    assert cq.image.min() == 0 and cq.image.max() == 1 and cq.spacing == pytest.approx((10, 3.75, 3.75))
    root = raw / "physionet"
    for pid in ("049", "050"):
        out = load_and_preprocess(
            root / "ct_scans" / f"{pid}.nii", size=(16, 32, 32), mask_path=root / "masks" / f"{pid}.nii"
        )
        drawn = np.asarray(nib.load(root / "masks" / f"{pid}.nii").dataobj)
        assert out.mask.dtype == np.uint8 and bool(out.mask.any()) == bool(drawn.any())
        if out.mask.any():  # acute blood well above brain after the brain window
            brain = (out.image > 0.3) & (out.image < 0.55) & (out.mask == 0)
            assert out.image[out.mask == 1].mean() - out.image[brain].mean() > 0.2
