"""`m3d-lit synth --m3d-data N`: a small M3D-Data set (M3D-Cap, M3D-VQA, M3D-Seg) of synthetic brain CT.

Written in the formats of the public download (the README's "Public datasets"), laid out as the YAMLs in
``datamodules/`` expect under ``data/M3D-Data``::

    M3D_Cap_npy/M3D_Cap.json                  {"train"|"validation"|"test": [{"image", "text"}]}
    M3D_Cap_npy/ct_case/<n>/image.npy, text.txt
    M3D_VQA/M3D_VQA_{train,val,test}.csv      four choices, question types 1-5, over the M3D-Cap images
    M3D_Seg_npy/0000/0000.json                decathlon-style: labels + train/validation/test lists
    M3D_Seg_npy/0000/case_<n>/image.npy, mask_<class>.npy   (classes: skull, ventricles, hemorrhage)

Images are float32 1 x D x H x W in [0, 1] (brain window L40/W80, then min-max), masks uint8 {0, 1}.
M3D-Seg cases are other scans than the M3D-Cap ones, as in the real data.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from m3d_lit.data.phantom import BLEED_TYPES, Phantom, draw_findings, render_phantom
from m3d_lit.data.phrasing import TYPE_NAMES, findings_report
from m3d_lit.data.preprocess import apply_window

__all__ = ["SEG_CLASSES", "SEG_DATASET", "structure_masks", "vqa_rows", "write_m3d_data"]

SEG_DATASET = "0000"
SEG_CLASSES = ("skull", "ventricles", "hemorrhage")
VQA_HEADER = ("Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C",
              "Choice D", "Answer", "Answer Choice")  # fmt: skip
SPLIT_SHARE = 0.2  # of the scans each for validation and test
_CODE = 2  # seed stream of M3D-Data scans (cq500 and physionet use 0 and 1)
_IVH = BLEED_TYPES.index("IVH") + 1
_CSF_MAX_HU = 17.0  # between CSF (5 HU) and white matter (29 HU), applied after smoothing the noise
_BONE_MIN_HU = 500.0
# Distractors include abnormalities the phantom never draws, so a scan with every finding still has three.
_ABNORMALITIES = (
    "No abnormality",
    "Skull fracture",
    "Brain tumor",
    "Ischemic stroke",
    "Hydrocephalus",
) + tuple(f"{name.capitalize()} hemorrhage" for name in TYPE_NAMES.values())


def _scan(index: int, shape: tuple[int, int, int], seed: int, balanced: bool) -> Phantom:
    rng = np.random.default_rng([seed, _CODE, index])
    return render_phantom(shape, draw_findings(rng, "balanced" if balanced else "cq500"), rng)


def _ventricles(hu: np.ndarray, bleeds: np.ndarray) -> np.ndarray:
    """The lateral ventricles: the two largest CSF-dark blobs (plus ventricular blood) clear of bone and air.

    The phantom keeps no ventricle map, so it is found in the pixels: sulci touch the skull, and a
    chronic bleed is excluded through the bleed map.
    """
    smooth = ndimage.gaussian_filter(hu.astype(np.float32), 0.8)
    outside = smooth <= -200.0
    candidate = (~outside & (smooth < _CSF_MAX_HU) & (bleeds == 0)) | (bleeds == _IVH)
    labels, count = ndimage.label(candidate)
    if count == 0:
        return candidate
    near_edge = ndimage.binary_dilation((hu >= _BONE_MIN_HU) | outside, iterations=2)
    touching = set(np.unique(labels[near_edge & (labels > 0)]).tolist())
    sizes = ndimage.sum(candidate, labels, range(1, count + 1))
    ranked = [int(i) + 1 for i in np.argsort(sizes)[::-1]]
    keep = [k for k in ranked if k not in touching and sizes[k - 1] >= 8][:2]
    return np.isin(labels, keep)


def structure_masks(phantom: Phantom) -> dict[str, np.ndarray]:
    """uint8 1 x D x H x W masks of `SEG_CLASSES` (hemorrhage: any bleed type; empty without one)."""
    masks = {
        "skull": phantom.hu >= _BONE_MIN_HU,
        "ventricles": _ventricles(phantom.hu, phantom.bleeds),
        "hemorrhage": phantom.bleeds > 0,
    }
    return {name: masks[name][None].astype(np.uint8) for name in SEG_CLASSES}


def _choices(
    answer: str, pool: Sequence[str], rng: random.Random, true: Collection[str] = ()
) -> tuple[list[str], str]:
    """Four distinct choices holding `answer` and three false ones (not in `true`), shuffled; and the letter."""
    others = [p for p in pool if p != answer and p not in true]
    choices = [answer, *rng.sample(others, 3)]
    rng.shuffle(choices)
    return choices, "ABCD"[choices.index(answer)]


def _abnormalities(truth: dict[str, int]) -> list[str]:
    """Every abnormality the scan shows, by name; the first is the VQA answer."""
    found = [f"{TYPE_NAMES[t].capitalize()} hemorrhage" for t in TYPE_NAMES if truth.get(t)]
    return found + (["Skull fracture"] if truth.get("Fracture") else []) or ["No abnormality"]


def _side(truth: dict[str, int]) -> str:
    left, right = truth.get("BleedLocation-Left"), truth.get("BleedLocation-Right")
    return "Both sides" if left and right else "Left" if left else "Right"


def vqa_rows(image: str, text: str, truth: dict[str, int], rng: random.Random) -> list[list[str]]:
    """The five M3D-VQA rows (question types 1-5) of one scan, in the CSV's column order.

    No false choice is true of the scan (a second bleed type is never offered as a distractor).

    Args:
        image: the image path as the CSV writes it.
        text: the scan's caption (the `Text` column).
        truth: the phantom's findings (CQ500 names).
        rng: draws the order of the choices.
    """
    found = _abnormalities(truth)
    bleeding = any(truth.get(t) for t in BLEED_TYPES)
    items = [
        (1, "In which plane is this image shown?", "Axial", ["Axial", "Coronal", "Sagittal", "Oblique"]),
        (2, "What is the contrast phase of this CT scan?", "Non-contrast",
         ["Non-contrast", "Arterial", "Portal venous", "Delayed"]),
        (3, "Which organ does this scan show?", "Brain", ["Brain", "Liver", "Lung", "Kidney"]),
        (4, "What abnormality is seen in this scan?", found[0], list(_ABNORMALITIES)),
        (5, "On which side is the hemorrhage?", _side(truth), ["Left", "Right", "Both sides", "Midline"])
        if bleeding
        else (5, "Where are the lateral ventricles?", "Central",
              ["Central", "Anterior only", "Posterior only", "Outside the skull"]),
    ]  # fmt: skip
    rows = []
    for qtype, question, answer, pool in items:
        choices, letter = _choices(answer, pool, rng, set(found))
        rows.append([image, text, str(qtype), question, *choices, answer, letter])
    return rows


def _splits(count: int) -> list[str]:
    n_hold = max(1, round(SPLIT_SHARE * count))
    return ["test"] * n_hold + ["validation"] * n_hold + ["train"] * (count - 2 * n_hold)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def _write_cap_vqa(out: Path, count: int, shape: tuple[int, int, int], seed: int, balanced: bool) -> None:
    cap: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    vqa: dict[str, list[list[str]]] = {"train": [], "validation": [], "test": []}
    for n, split in enumerate(_splits(count)):
        phantom = _scan(n, shape, seed, balanced)
        rel = f"M3D_Cap_npy/ct_case/{n:06d}"
        _save(out / rel / "image.npy", apply_window(phantom.hu, "brain")[None].astype(np.float32))
        text = findings_report(phantom.truth)
        (out / rel / "text.txt").write_text(text + "\n", encoding="utf-8")
        cap[split].append({"image": f"{rel}/image.npy", "text": f"{rel}/text.txt"})
        vqa[split] += vqa_rows(f"{rel}/image.npy", text, phantom.truth, random.Random(seed * 100_003 + n))
    (out / "M3D_Cap_npy" / "M3D_Cap.json").write_text(json.dumps(cap, indent=1) + "\n", encoding="utf-8")
    (out / "M3D_VQA").mkdir()
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        with (out / "M3D_VQA" / f"M3D_VQA_{name}.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([list(VQA_HEADER), *vqa[split]])


def _write_seg(out: Path, count: int, shape: tuple[int, int, int], seed: int, balanced: bool) -> None:
    root = out / "M3D_Seg_npy"
    labels = {str(i): name for i, name in enumerate(SEG_CLASSES, start=1)}
    data: dict = {"name": "synthetic brain CT", "modality": {"0": "CT"}, "labels": labels}
    data.update({"train": [], "validation": [], "test": []})
    for n, split in enumerate(_splits(count)):
        # Other scans than M3D-Cap's: indices after them.
        phantom = _scan(count + n, shape, seed, balanced)
        rel = f"{SEG_DATASET}/case_{n:05d}"
        _save(root / rel / "image.npy", apply_window(phantom.hu, "brain")[None].astype(np.float32))
        for name, mask in structure_masks(phantom).items():
            np.save(root / rel / f"mask_{name}.npy", mask)
        data[split].append(
            {"image": f"{rel}/image.npy", "label": [f"{rel}/mask_{c}.npy" for c in SEG_CLASSES]}
        )
    (root / SEG_DATASET / f"{SEG_DATASET}.json").write_text(
        json.dumps(data, indent=1) + "\n", encoding="utf-8"
    )


def write_m3d_data(out: Path, count: int, shape: tuple[int, int, int], seed: int, balanced: bool) -> None:
    """Write `count` M3D-Cap/VQA scans and `count` M3D-Seg cases into the folder `out`.

    Args:
        out: the M3D-Data folder (created; the caller builds it under a temporary name).
        count: scans per part, at least 3 (one each for train, validation and test).
        shape: (D, H, W) of every volume, H == W.
        seed: base seed.
        balanced: each finding in about half of the scans instead of CQ500's frequencies.
    """
    if count < 3:
        raise ValueError(f"--m3d-data {count}: need at least 3 scans (train, validation and test)")
    if min(shape) < 8 or shape[1] != shape[2]:
        raise ValueError(f"shape {shape}: need D, H, W >= 8 and H == W")
    out.mkdir(parents=True, exist_ok=True)
    _write_cap_vqa(out, count, shape, seed, balanced)
    _write_seg(out, count, shape, seed, balanced)
