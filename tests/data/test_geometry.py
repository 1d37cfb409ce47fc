"""Masks in the scan's own geometry: a mask taken through preprocessing and back lies where it was.

Each scan is a phantom drawn in world (RAS, mm) coordinates, a head with a bleed on the patient's left,
stored with a non-identity affine (LPS order, anisotropic, permuted and flipped axes, oblique, and a DICOM
series whose slices run from head to foot). The ground truth of every stored voxel comes from its world
position, computed here from the affine or the DICOM tags the test writes, never from the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations
from pydicom import dcmread

from m3d_lit.commands import synth
from m3d_lit.data import synthetic
from m3d_lit.data.geometry import CANONICAL_AXES, ScanGeometry, grid_affine, manifest_geometry, write_mask
from m3d_lit.data.io import load_scan, read_nifti
from m3d_lit.data.preprocess import load_and_preprocess, preprocess_with_box
from m3d_lit.errors import InputError

SIZE = (24, 48, 48)  # the demo grid is coarser; here the loss to resampling stays ~0.02 Dice
HEAD_RADII = np.array([70.0, 90.0, 60.0])  # mm, RAS
BLEED = (np.array([-35.0, 10.0, 10.0]), 22.0)  # centre (x < 0: the patient's left in RAS) and radius
FIELD = np.array([200.0, 220.0, 160.0])  # mm covered along x, y, z


def phantom(world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HU and bleed mask at world points (... x 3, RAS mm): air, brain at 30 HU, the bleed at 70 HU."""
    head = (((world / HEAD_RADII) ** 2).sum(-1)) <= 1.0
    bleed = np.linalg.norm(world - BLEED[0], axis=-1) <= BLEED[1]
    hu = np.where(head, 30.0, -1000.0)
    return np.where(bleed & head, 70.0, hu).astype(np.int16), (bleed & head).astype(np.uint8)


def voxel_world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return nib.affines.apply_affine(affine, ijk)


def nifti_affine(directions: np.ndarray, zooms: tuple[float, float, float]) -> tuple[np.ndarray, tuple]:
    """An affine with these unit direction columns and voxel sizes whose grid covers FIELD, centred at 0."""
    linear = directions * np.asarray(zooms)
    extent = np.abs(np.linalg.inv(directions) @ FIELD)  # the field along each voxel axis
    shape = tuple(int(math.ceil(e / z)) for e, z in zip(extent, zooms))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.array(shape) - 1) / 2)
    return affine, shape


def rotation_z(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


CASES = {
    # i -> patient left, j -> posterior, k -> superior (the synthetic PhysioNet layout), anisotropic
    "lps_anisotropic": (np.diag([-1.0, -1.0, 1.0]), (3.0, 3.5, 6.0)),
    # i -> inferior, j -> right, k -> anterior: every axis permuted, two of them flipped
    "permuted_flipped": (np.array([[0.0, 1, 0], [0, 0, 1], [-1, 0, 0]]), (5.0, 3.0, 4.0)),
    # RAS-stored, tilted 12 degrees in the axial plane
    "oblique": (rotation_z(12.0), (3.5, 3.5, 5.0)),
}


def write_case(folder: Path, name: str) -> tuple[Path, Path, np.ndarray]:
    affine, shape = nifti_affine(*CASES[name])
    hu, mask = phantom(voxel_world(affine, shape))
    nib.save(nib.Nifti1Image(hu, affine), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), folder / f"{name}_mask.nii.gz")
    return folder / f"{name}.nii.gz", folder / f"{name}_mask.nii.gz", mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask)).mean(0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_nifti_mask_round_trip_overlays_the_original(tmp_path: Path, name: str) -> None:
    image, mask_path, truth = write_case(tmp_path, name)
    prepared = load_and_preprocess(image, size=SIZE, mask_path=mask_path)
    # the model sees the bleed on the left half of the grid: W runs from patient right to left
    assert np.argwhere(prepared.mask[0])[:, 2].mean() > SIZE[2] / 2
    out = tmp_path / "back.nii.gz"
    write_mask(out, prepared.mask[0], prepared.geometry)
    written = nib.load(out)
    back = np.asarray(written.dataobj)
    source = nib.load(image)
    assert back.shape == source.shape and back.dtype == np.uint8
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)  # float32 in the header
    assert dice(back, truth) >= 0.9, dice(back, truth)
    where, expected = centroid(back, written.affine), centroid(truth, source.affine)
    assert where[0] < -20 and np.abs(where - expected).max() < 3.0, (where, expected)


def test_reoriented_copy_gives_the_same_model_input_and_world_mask(tmp_path: Path) -> None:
    image, mask_path, _ = write_case(tmp_path, "lps_anisotropic")
    first = load_and_preprocess(image, size=SIZE, mask_path=mask_path)
    for k, codes in enumerate([("R", "A", "S"), ("S", "L", "P"), ("A", "I", "R")]):
        ornt = orientations.ornt_transform(
            orientations.io_orientation(nib.load(image).affine), orientations.axcodes2ornt(codes)
        )
        copies = []
        for path in (image, mask_path):
            copies.append(tmp_path / f"copy{k}_{path.name}")
            nib.save(nib.load(path).as_reoriented(ornt), copies[-1])
        assert nib.aff2axcodes(nib.load(copies[0]).affine) == codes
        second = load_and_preprocess(copies[0], size=SIZE, mask_path=copies[1])
        np.testing.assert_array_equal(second.image, first.image)
        np.testing.assert_array_equal(second.mask, first.mask)
        # the same model-grid mask goes back to the same voxels in world coordinates
        back_first = first.geometry.to_source(first.mask[0])
        back_second = second.geometry.to_source(first.mask[0])
        np.testing.assert_array_equal(orientations.apply_orientation(back_first, ornt), back_second)


def write_dicom_head_to_foot(folder: Path) -> tuple[list[Path], float, float, float]:
    """A series whose slice normal points to the feet (column cosine anterior), files in no useful order.

    Returns the files and (row spacing, column spacing, slice step) in mm.
    """
    folder.mkdir()
    row_mm, col_mm, step = 3.0, 3.5, 6.0
    rows, cols, count = 74, 58, 28
    row_cos, col_cos = np.array([1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])  # LPS: left, anterior
    normal = np.cross(row_cos, col_cos)  # (0, 0, -1): inferior
    ident = {"n": 0, "seed": 0, "intercept": -1024}
    ds = synthetic._ct_dataset((rows, cols), (step, row_mm, col_mm), "head_to_foot", ident, False)
    ds.ImageOrientationPatient = [*row_cos, *col_cos]
    ds.PixelSpacing = [row_mm, col_mm]
    centre = (
        -(cols - 1) / 2 * col_mm * row_cos
        - (rows - 1) / 2 * row_mm * col_cos
        - (count - 1) / 2 * step * normal
    )
    files = []
    for k in range(count):
        position = centre + k * step * normal
        hu, _ = phantom(dicom_world(position, row_cos, col_cos, rows, cols, row_mm, col_mm))
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{k + 1}"
        ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        files.append(folder / f"IM{(k * 11) % count:04d}.dcm")  # file names out of slice order
        ds.save_as(files[-1], enforce_file_format=True)
    return files, row_mm, col_mm, step


def dicom_world(position, row_cos, col_cos, rows, cols, row_mm, col_mm) -> np.ndarray:
    """RAS world points of one slice's pixels [r, c], from the DICOM definition (LPS, column c along the
    row cosine, row r along the column cosine)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = position + c[..., None] * col_mm * row_cos + r[..., None] * row_mm * col_cos
    return lps * np.array([-1.0, -1.0, 1.0])


def test_dicom_mask_lands_in_patient_coordinates(tmp_path: Path) -> None:
    files, *_ = write_dicom_head_to_foot(tmp_path / "series")
    scan = load_scan(tmp_path / "series")
    bleed = (scan.hu == 70).astype(np.uint8)  # the reader's canonical volume, the bleed picked by its HU
    _, grid, box = preprocess_with_box(scan.hu, bleed, SIZE)
    geometry = ScanGeometry.build(scan.stored_shape, scan.affine, box, SIZE)
    write_mask(tmp_path / "mask.nii.gz", grid[0], geometry)
    written = nib.load(tmp_path / "mask.nii.gz")
    out, to_voxel = np.asarray(written.dataobj), np.linalg.inv(written.affine)
    hits, truths = [], []
    for path in files:  # each pixel of each file, found in the written mask through its world position
        slice_ = dcmread(path)
        iop = np.array(slice_.ImageOrientationPatient, float)
        world = dicom_world(
            np.array(slice_.ImagePositionPatient, float), iop[:3], iop[3:], slice_.Rows, slice_.Columns,
            *map(float, slice_.PixelSpacing),
        )  # fmt: skip
        ijk = nib.affines.apply_affine(to_voxel, world)
        assert np.abs(ijk - np.round(ijk)).max() < 1e-3
        ijk = np.round(ijk).astype(int)
        hits.append(out[ijk[..., 0], ijk[..., 1], ijk[..., 2]])
        truths.append(slice_.pixel_array.astype(np.int32) - 1024 == 70)
    hits, truths = np.stack(hits), np.stack(truths)
    assert out.shape == scan.stored_shape and int(out.sum()) == int(hits.sum())
    assert dice(hits, truths) >= 0.9, dice(hits, truths)
    assert centroid(out, written.affine)[0] < -20  # still on the patient's left


def test_ask_mask_out_writes_the_scan_geometry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ask --mask-out` turns the answer's mask logits into a mask over the input file."""
    from types import SimpleNamespace

    from m3d_lit.cli import main
    from m3d_lit.commands import ask
    from m3d_lit.inference.predictor import Prediction, Predictor

    image, mask_path, truth = write_case(tmp_path, "permuted_flipped")
    prepared = load_and_preprocess(image, size=SIZE, mask_path=mask_path)
    logits = torch.from_numpy(prepared.mask.astype(np.float32) * 20 - 10)  # the true mask, as logits
    request = SimpleNamespace(geometry=prepared.geometry)
    answer = ask.Answer(Prediction(request, "It is [SEG].", [], None, logits), prepared)
    loaded = SimpleNamespace(notes=[])
    monkeypatch.setattr(Predictor, "load", lambda *args: SimpleNamespace(loaded=loaded))
    monkeypatch.setattr(ask, "ask", lambda *args: answer)
    argv = ["ask", "--checkpoint", str(tmp_path / "any.ckpt"), "--volume", str(image), "--question", "Where?"]
    assert main([*argv, "--mask-out", str(tmp_path / "m.nii.gz")]) == 0
    written = nib.load(tmp_path / "m.nii.gz")
    np.testing.assert_allclose(written.affine, nib.load(image).affine, atol=1e-5)
    assert dice(np.asarray(written.dataobj), truth) >= 0.9
    assert main([*argv, "--mask-out", str(tmp_path / "m.nrrd")]) == 2  # refused before any work
    assert main([*argv, "--mask-out", str(tmp_path / "no" / "m.nii")]) == 2


def test_model_grid_mask_declares_the_model_axes(tmp_path: Path) -> None:
    """Without a geometry (an `.npy` scan) the mask stays on the grid, and its affine says which way the grid's
    axes point: read back like any scan, it is the grid again, not a mirror of it."""
    grid = np.zeros(SIZE, np.float32)
    grid[2:5, 10:20, 30:40] = 1.0  # superior-ish, anterior, on the patient's left
    write_mask(tmp_path / "grid.nii.gz", grid, None)
    assert nib.aff2axcodes(grid_affine(SIZE)) == CANONICAL_AXES
    back, spacing = read_nifti(tmp_path / "grid.nii.gz")
    np.testing.assert_array_equal(back, grid)
    assert spacing == (1.0, 1.0, 1.0)
    write_mask(
        tmp_path / "grid.npy", grid * 0.9, ScanGeometry.build((1, 1, 1), np.eye(4), [slice(0, 1)] * 3, SIZE)
    )
    np.testing.assert_array_equal(np.load(tmp_path / "grid.npy"), grid[None].astype(np.uint8))


def test_geometry_json_round_trip_and_bad_text(tmp_path: Path) -> None:
    affine, shape = nifti_affine(*CASES["oblique"])
    geometry = ScanGeometry.build(shape, affine, (slice(1, 50), slice(3, 40), slice(None)), SIZE)
    assert ScanGeometry.from_json(geometry.to_json(), "m.csv") == geometry
    degenerate = json.dumps({**json.loads(geometry.to_json()), "affine": np.zeros((4, 4)).tolist()})
    for bad in (
        "{",
        '{"shape": [1, 2]}',
        geometry.to_json().replace('"box": [[', '"box": [[-5, 0], ['),
        degenerate,
    ):
        with pytest.raises(InputError, match="m.csv: .*(geometry|box|affine)"):
            ScanGeometry.from_json(bad, "m.csv")


def test_prepared_manifest_gives_eval_masks_over_the_raw_files(tmp_path: Path) -> None:
    """`prepare` records each scan's geometry; `eval --save-masks` (its `MaskSaver`) writes a mask given
    on the prepared grid over the raw NIfTI: here the prepared true mask comes back onto the raw one."""
    from m3d_lit.data.prepare import prepare_volumes
    from m3d_lit.inference.records import MaskSaver

    raw = tmp_path / "raw"
    argv = ["--out", str(raw), "--physionet", "3", "--balanced", "--shape", "16", "64", "64"]
    assert synth.main(argv) == 0
    out = tmp_path / "prepared"
    result = prepare_volumes("physionet", raw / "physionet", out, size=(16, 64, 64), progress=False)
    images = {sid: out / "images" / f"{sid}.npy" for sid in result.ids}
    saver = MaskSaver(tmp_path / "eval" / "masks", {f"{sid}:seg": path for sid, path in images.items()})
    compared = 0
    for sid in result.ids:
        grid = np.load(out / "masks" / f"{sid}.npy")
        truth = nib.load(raw / "physionet" / "masks" / f"{sid}.nii")
        if not grid.any():
            continue
        assert manifest_geometry(images[sid]).shape == truth.shape
        name = saver({"id": f"{sid}:seg"}, torch.from_numpy(grid.astype(np.float32) * 20 - 10))
        written = nib.load(tmp_path / "eval" / name)
        np.testing.assert_allclose(written.affine, truth.affine, atol=1e-5)
        assert dice(np.asarray(written.dataobj), np.asarray(truth.dataobj)) >= 0.9
        compared += 1
    assert compared >= 1 and name == f"masks/{sid}_seg.nii.gz"
