"""Shared data fixtures: tiny files in the M3D-Data and ``prepare`` formats, and a tiny local tokenizer."""

from __future__ import annotations

import csv
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"  # on the import path of every test (`pythonpath`) and of their subprocesses
SHARED = REPO.parent / "shared"  # the workplace's fixture kits beside the repository

DATA_SHAPE = (1, 8, 16, 16)

# Tiny model overrides shared by the tests that train through the real CLI (8x16x16 volumes, one layer each).
SMALL = {
    "img_size": [8, 16, 16],
    "patch_size": [4, 8, 8],
    "max_length": 48,
    "vision": {"hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2},
}
LAMED = {
    **SMALL,
    "llm": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "segmentation": {"hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "decoder_depth": 1,
                     "decoder_heads": 2, "decoder_mlp_dim": 64},
}  # fmt: skip
CLIP = {
    **SMALL,
    "text": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "clip": {"embed_dim": 16, "max_length": 32},
}


def built(task):
    """A task with its model built, as Lightning's `configure_model` builds it (outside a trainer: on the CPU)."""
    task.configure_model()
    return task


def write_volume(path: Path, seed: int, dtype: str = "float32") -> Path:
    """A random 1x8x16x16 volume in [0, 1] at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).random(DATA_SHAPE).astype(dtype))
    return path


def write_mask(path: Path, empty: bool = False) -> Path:
    """A cube mask (or an empty one) with the volume's geometry, uint8 {0, 1}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(DATA_SHAPE, dtype=np.uint8)
    if not empty:
        mask[:, 2:5, 3:9, 4:7] = 1
    np.save(path, mask)
    return path


@pytest.fixture
def tiny_tokenizer():
    """A WordLevel tokenizer built locally (never downloaded) with the project's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [
        "Is there an intracranial hemorrhage ? Yes , there is a bleed on the left side .",
        "No , there is no fracture . Describe the findings of this scan .",
        "Can you segment the liver in this image ? It is . Sorry , there is no liver .",
        "What organ is shown ? Choices : A . brain B . liver C . lung D . heart",
    ]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        text, trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.add_tokens(["<im_patch>", "[SEG]", "<bx_start>", "<bx_end>"], special_tokens=True)
    return tok


@pytest.fixture
def m3d_cap_data(tmp_path: Path) -> dict[str, Path]:
    """M3D-Cap: JSON with train/validation/test lists of image/text relative paths (3 + 2 + 2)."""
    root = tmp_path / "m3d_cap"
    splits = {}
    for split, n in (("train", 3), ("validation", 2), ("test", 2)):
        items = []
        for i in range(n):
            rel = f"ct_case/{split}_{i:03d}"
            write_volume(root / rel / "image.npy", seed=i)
            (root / rel / "text.txt").write_text(f"Findings: case {split} {i} shows a bleed.\n")
            items.append({"image": f"{rel}/image.npy", "text": f"{rel}/text.txt"})
        splits[split] = items
    (root / "M3D_Cap.json").write_text(json.dumps(splits))
    return {"root": root, "json_path": root / "M3D_Cap.json"}


VQA_HEADER = [
    "Image Path",
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
]


def write_vqa_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(VQA_HEADER)
        writer.writerows(rows)
    return path


@pytest.fixture
def m3d_vqa_data(tmp_path: Path) -> dict[str, Path]:
    """M3D-VQA: one CSV per split (4 training rows, 2 val, 2 test) over tiny volumes."""
    root = tmp_path / "m3d_vqa"
    out = {"root": root}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        rows = []
        for i in range(n):
            rel = f"vqa/{split}_{i}.npy"
            write_volume(root / rel, seed=10 + i)
            rows.append(
                [rel, "report", "3", "What organ is shown?", "brain", "liver", "lung", "heart", "liver", "B"]
            )
        out[f"{split}_csv"] = write_vqa_csv(root / f"M3D_VQA_{split}.csv", rows)
    return out


@pytest.fixture
def m3d_seg_data(tmp_path: Path) -> dict:
    """M3D-Seg: ``0000/0000.json`` (labels + train/test), one image with a positive and an empty mask."""
    root = tmp_path / "m3d_seg"
    ds = root / "0000"
    data = {"labels": {"1": "liver", "2": "kidney"}, "train": [], "test": []}
    for split, n in (("train", 2), ("test", 1)):
        for i in range(n):
            case = f"0000/{split}_{i}"
            write_volume(root / case / "image.npy", seed=20 + i)
            write_mask(root / case / "mask_1.npy")
            write_mask(root / case / "mask_2.npy", empty=True)
            data[split].append(
                {"image": f"{case}/image.npy", "label": [f"{case}/mask_1.npy", f"{case}/mask_2.npy"]}
            )
    (ds / "0000.json").write_text(json.dumps(data))
    return {"root": root, "datasets": ["0000"]}


def write_prepared(out: Path, dataset: str, n_per_split: int = 2) -> Path:
    """A ``prepare`` output folder: float16 images, QA files with open/closed/seg lines, reports.jsonl."""
    reports = []
    for split in ("train", "val", "test"):
        lines = []
        for i in range(n_per_split):
            sid = f"{dataset}-{split}-{i}"
            write_volume(out / "images" / f"{sid}.npy", seed=zlib.crc32(sid.encode()), dtype="float16")
            base = {
                "id": sid,
                "image": f"images/{sid}.npy",
                "dataset": dataset,
                "patient": sid,
                "label": {"ICH": i % 2},
            }
            lines.append(
                {
                    **base,
                    "question": "Is there an intracranial hemorrhage?",
                    "answer": "Yes, on the left.",
                    "kind": "open",
                }
            )
            lines.append({**base, "question": "Is there a fracture?", "answer": "No.", "kind": "closed"})
            if dataset == "physionet":
                write_mask(out / "masks" / f"{sid}.npy", empty=i % 2 == 1)
                answer = "It is [SEG]." if i % 2 == 0 else "There is no hemorrhage."
                lines.append(
                    {
                        **base,
                        "question": "Segment the hemorrhage.",
                        "answer": answer,
                        "kind": "seg",
                        "mask": f"masks/{sid}.npy",
                    }
                )
            reports.append(
                {
                    "id": sid,
                    "image": f"images/{sid}.npy",
                    "text": "A bleed on the left.",
                    "split": split,
                    "dataset": dataset,
                }
            )
        (out / f"qa_{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (out / "reports.jsonl").write_text("".join(json.dumps(x) + "\n" for x in reports))
    return out


@pytest.fixture
def brainct_data(tmp_path: Path) -> dict[str, Path]:
    """Two tiny ``prepare`` outputs: ``cq500`` (open + closed) and ``physionet`` (+ seg with masks)."""
    return {name: write_prepared(tmp_path / "prepared" / name, name) for name in ("cq500", "physionet")}


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw synthetic CQ500 (DICOM) and PhysioNet (NIfTI) scans, 10 of each, balanced findings."""
    from m3d_lit.cli import main

    raw = tmp_path_factory.mktemp("brainct") / "raw"
    assert main(["synth", "--out", str(raw), "--cq500", "10", "--physionet", "10", "--balanced"]) == 0
    return raw


@pytest.fixture(scope="session")
def prepared(synthetic_raw: Path) -> list[Path]:
    """The synthetic scans prepared at the tiny preset's 1x32x64x64: [cq500 folder, physionet folder]."""
    from m3d_lit.cli import main

    roots = []
    for name in ("cq500", "physionet"):
        out = synthetic_raw.parent / "data" / name
        argv = [
            "prepare",
            name,
            "--root",
            str(synthetic_raw / name),
            "--out",
            str(out),
            "--size",
            "32",
            "64",
            "64",
        ]
        assert main(argv) == 0
        roots.append(out)
    return roots


@pytest.fixture(scope="session")
def stage3_checkpoint(prepared: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny stage-3 checkpoint trained for 2 steps from scratch through the real CLI."""
    from m3d_lit.cli import main

    folder = tmp_path_factory.mktemp("stage3")
    argv = [
        "fit", "-c", str(REPO / "stages/stage3_finetune.yaml"), "-c", str(REPO / "stages/trainer/cpu.yaml"),
        "--model.preset", "tiny", "--model.init_from", "null",
        "--data.roots", json.dumps([str(r) for r in prepared]), "--data.batch_size", "4",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(folder)  # the recipe writes its run folder runs/stage3/version_0/ under the working folder
    try:
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return folder / "runs" / "stage3" / "version_0" / "checkpoints" / "last.ckpt"
