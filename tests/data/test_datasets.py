"""Datasets, volume loading, path checks, jsonl errors and seeded augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA_SHAPE, write_mask, write_volume

from m3d_lit.data.augment import BRAIN_CT_FLIP_AXES, VolumeAugment, sample_seed
from m3d_lit.data.datasets import (
    QAJsonlDataset,
    Record,
    RecordDataset,
    SampleKey,
    read_qa_jsonl,
    swap_images,
)
from m3d_lit.data.datasets import (
    load_prepared_volume as load_volume,
)
from m3d_lit.errors import InputError


def test_load_volume_converts_or_keeps_float16_and_adds_a_missing_channel(tmp_path):
    path = write_volume(tmp_path / "a.npy", seed=0, dtype="float16")
    volume = load_volume(path)
    assert volume.dtype == torch.float32 and tuple(volume.shape) == DATA_SHAPE
    np.testing.assert_allclose(volume.numpy(), np.load(path).astype(np.float32))
    # training Datasets keep the float16 cache float16 (the model widens it on the device)
    kept = load_volume(path, widen=False)
    assert kept.dtype == torch.float16 and torch.equal(kept.float(), volume)
    np.save(tmp_path / "b.npy", np.zeros((8, 16, 16), np.float32))
    assert tuple(load_volume(tmp_path / "b.npy").shape) == DATA_SHAPE
    np.save(tmp_path / "c.npy", np.zeros((2, 8, 16, 16), np.float32))
    with pytest.raises(InputError, match=r"c\.npy: expected a 1 x D x H x W volume"):
        load_volume(tmp_path / "c.npy")


def test_qa_jsonl_dataset_items_follow_the_contract(brainct_data):
    ds = QAJsonlDataset(brainct_data["physionet"] / "qa_test.jsonl")
    assert len(ds) == 6
    items = [ds[i] for i in range(len(ds))]
    assert set(items[0]) == {"id", "image", "question", "answer", "kind", "mask", "dataset"}
    # the prepared cache is float16 and the item keeps it (the model widens it on the device)
    assert items[0]["image"].dtype == torch.float16 and tuple(items[0]["image"].shape) == DATA_SHAPE
    seg = [it for it in items if it["kind"] == "seg"]
    assert len(seg) == 2 and all(
        it["mask"] is not None and tuple(it["mask"].shape) == DATA_SHAPE for it in seg
    )
    assert all(it["mask"] is None for it in items if it["kind"] != "seg")
    assert items[0]["dataset"] == "physionet"


def test_blank_images_and_img_size_check(brainct_data):
    path = brainct_data["cq500"] / "qa_val.jsonl"
    blank = QAJsonlDataset(path, img_size=DATA_SHAPE[1:], blank_images=True)[0]
    assert tuple(blank["image"].shape) == DATA_SHAPE and not blank["image"].any()
    with pytest.raises(InputError, match=r"differs from img_size \(8, 32, 32\)"):
        QAJsonlDataset(path, img_size=(8, 32, 32))[0]


def test_swapped_images_give_every_question_another_patients_scan(brainct_data):
    path = brainct_data["physionet"] / "qa_test.jsonl"
    own = read_qa_jsonl(path)
    swapped = swap_images(own, seed=0)
    assert swapped == swap_images(own, seed=0)
    assert [(r.id, r.question, r.answer, r.mask) for r in swapped] == [
        (r.id, r.question, r.answer, r.mask) for r in own
    ]
    mapping = {a.image: b.image for a, b in zip(own, swapped)}
    assert len(mapping) >= 2 and all(src != dst for src, dst in mapping.items())
    assert sorted(mapping.values()) == sorted(mapping)  # a permutation of the file's scans
    for a, b in zip(own, swapped):  # every row of one scan moves to the same other scan
        assert mapping[a.image] == b.image
    ds = QAJsonlDataset(path, swapped_images=True)
    moved = next(i for i, r in enumerate(own) if r.image != ds.records[i].image)
    assert torch.equal(ds[moved]["image"], load_volume(mapping[own[moved].image]))
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        swap_images([r for r in own if r.image == own[0].image])
    with pytest.raises(ValueError, match="not both"):
        QAJsonlDataset(path, blank_images=True, swapped_images=True)


def test_bad_jsonl_line_names_file_and_line(tmp_path, brainct_data):
    path = brainct_data["cq500"] / "qa_train.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, "{not json")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"qa_train\.jsonl: line 3 is not JSON"):
        read_qa_jsonl(path)
    path.write_text('{"id": "x", "image": "images/x.npy", "question": "q", "answer": "", "kind": "open"}\n')
    with pytest.raises(InputError, match=r"line 1 lacks non-empty string fields \['answer'\]"):
        read_qa_jsonl(path)


def test_missing_files_stop_with_one_error_listing_count_and_first_paths(brainct_data):
    root = brainct_data["physionet"]
    for sid in ("physionet-test-0", "physionet-test-1"):
        (root / "images" / f"{sid}.npy").unlink()
    (root / "masks" / "physionet-test-0.npy").write_bytes(b"not a npy file")
    with pytest.raises(InputError) as err:
        QAJsonlDataset(root / "qa_test.jsonl")
    message = str(err.value)
    assert message.startswith(str(root / "qa_test.jsonl"))
    assert "7 files named here are missing or unreadable" in message  # 6 image refs + 1 bad mask
    assert "physionet-test-0.npy (missing)" in message and "unreadable" in message


def _two_level_volume() -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric cube so every rotation and flip is visible, and an image that encodes the mask."""
    mask = torch.zeros(1, 8, 16, 16)
    mask[:, 1:3, 2:5, 9:15] = 1
    return 0.2 + 0.6 * mask, mask


def test_augmentation_keeps_image_and_mask_aligned():
    image, mask = _two_level_volume()
    augment = VolumeAugment(flip_axes=(0, 1, 2), flip_prob=0.5)
    moved = 0
    for seed in range(24):
        out_image, out_mask = augment(image.clone(), mask.clone(), seed)
        assert out_image.shape == image.shape and out_image.dtype == torch.float32
        threshold = (out_image.max() + out_image.min()) / 2
        assert torch.equal(out_image > threshold, out_mask > 0.5)
        moved += not torch.equal(out_mask, mask)
    assert moved > 10  # the geometric transforms did run


def test_augmentation_is_fixed_by_the_seed_and_brain_ct_default_never_mirrors():
    image, mask = _two_level_volume()
    augment = VolumeAugment()
    a, _ = augment(image, mask, sample_seed(0, 1, 5))
    b, _ = augment(image, mask, sample_seed(0, 1, 5))
    assert torch.equal(a, b)
    assert len({sample_seed(0, e, 5) for e in range(4)}) == 4
    brain = VolumeAugment(flip_axes=BRAIN_CT_FLIP_AXES, flip_prob=1.0, rotate_prob=0.0)
    _, kept = brain(image, mask, 3)
    assert BRAIN_CT_FLIP_AXES == () and torch.equal(kept, mask)
    with pytest.raises(ValueError, match="flip_axes"):
        VolumeAugment(flip_axes=(3,))


def test_a_non_square_volume_turns_by_half_a_turn_with_its_mask():
    """H != W: no crash; a rotation is by 180 degrees (both in-plane axes reversed), mask with image."""
    image = torch.arange(4 * 8 * 16, dtype=torch.float32).reshape(1, 4, 8, 16) / 512
    mask = (image > 0.6).float()
    augment = VolumeAugment(flip_axes=(), rotate_prob=1.0, intensity_prob=0.0)
    turned, turned_mask = augment(image, mask, 0)
    assert turned.shape == image.shape and turned_mask.shape == mask.shape
    assert torch.equal(turned, torch.flip(image, dims=(2, 3))) and torch.equal(
        turned_mask, torch.flip(mask, dims=(2, 3))
    )
    kept, _ = VolumeAugment(flip_axes=(), rotate_prob=0.0, intensity_prob=0.0)(image, mask, 0)
    assert torch.equal(kept, image)


def test_record_dataset_augments_train_items_per_epoch_only(brainct_data, tmp_path):
    records = read_qa_jsonl(brainct_data["physionet"] / "qa_train.jsonl")
    train = RecordDataset(records, train=True, augment=VolumeAugment(flip_axes=(0, 1, 2)), seed=7)
    plain = RecordDataset(records, train=False, augment=VolumeAugment(), seed=7)
    assert torch.equal(train[SampleKey(2, 3)]["image"], train[SampleKey(2, 3)]["image"])
    epochs = [train[SampleKey(2, e)]["image"] for e in range(6)]
    assert any(not torch.equal(epochs[0], x) for x in epochs[1:])
    assert torch.equal(plain[SampleKey(2, 3)]["image"], load_volume(records[2].image))


def test_image_dropout_blanks_train_items_without_a_mask_only(brainct_data):
    records = read_qa_jsonl(brainct_data["physionet"] / "qa_train.jsonl")
    assert any(r.mask is None for r in records) and any(r.mask is not None for r in records)
    keys = [SampleKey(i, e) for e in range(20) for i in range(len(records))]
    dropout = RecordDataset(records, train=True, seed=3, blank_prob=0.3)
    items = {k: dropout[k] for k in keys}
    blanked = [k for k, item in items.items() if not item["image"].any()]
    assert all(records[k.index].mask is None for k in blanked)  # a mask's scan is never taken away
    unmasked = sum(records[k.index].mask is None for k in keys)
    assert 0.2 < len(blanked) / unmasked < 0.4
    again = RecordDataset(records, train=True, seed=3, blank_prob=0.3)
    assert [k for k in keys if not again[k]["image"].any()] == blanked  # fixed by (seed, epoch, index)
    k = blanked[0]
    assert items[k]["answer"] in records[k.index].answer  # the text stays with the question
    evaluation = RecordDataset(records, train=False, seed=3, blank_prob=0.3)
    assert all(evaluation[i]["image"].any() for i in range(len(records)))
    off = RecordDataset(records, train=True, seed=3)
    assert all(off[k]["image"].any() for k in keys)


def test_negative_answers_follow_an_empty_mask(tmp_path):
    image = write_volume(tmp_path / "img.npy", seed=1)
    full, empty = write_mask(tmp_path / "m1.npy"), write_mask(tmp_path / "m2.npy", empty=True)
    ds = RecordDataset(
        [
            Record("x", image, ("Segment it.",), ("It is [SEG].",), "seg", "d", tmp_path, m, ("None.",))
            for m in (full, empty)
        ]
    )
    assert ds[0]["answer"] == "It is [SEG]." and ds[0]["mask"] is not None
    assert ds[1]["answer"] == "None." and ds[1]["mask"] is None


def test_augmenting_a_float16_cache_gives_what_its_float32_values_gave():
    """A float16 volume is augmented in float32, as before volumes kept their stored dtype."""
    image, mask = _two_level_volume()
    augment = VolumeAugment(flip_axes=(0, 1, 2), flip_prob=0.5)
    for seed in range(6):
        half, _ = augment(image.half(), mask.clone(), seed)
        wide, _ = augment(image.half().float(), mask.clone(), seed)
        assert half.dtype == torch.float32 and torch.equal(half, wide)
