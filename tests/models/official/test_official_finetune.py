"""Stage 3 from an official M3D-LaMed directory through the real CLI (`--model.init_from DIR`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED

from m3d_lit.cli import main
from m3d_lit.models.official.lamed import build_official_lamed

KIT = SHARED / "data" / "m3d_official"
pytestmark = pytest.mark.skipif(not KIT.is_dir(), reason=f"parity kit not found at {KIT}")


def write_prepared(out: Path, size: list[int]) -> Path:
    """A `prepare`-style folder from the kit's volumes: open, closed and [SEG] questions with a mask."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    shutil.copy(KIT / "inputs" / "seg_target_0.npy", out / "masks" / "m.npy")
    for split in ("train", "val", "test"):
        lines = []
        for i in range(3):
            sid = f"{split}-{i}"
            np.save(
                out / "images" / f"{sid}.npy", np.load(KIT / "inputs" / f"volume_{i}.npy").astype(np.float16)
            )
            base = {"id": sid, "image": f"images/{sid}.npy", "dataset": "physionet", "patient": sid,
                    "label": {"ICH": i % 2}}  # fmt: skip
            lines += [
                {**base, "question": "Is there a lesion in the liver?", "answer": "Yes, a small one.", "kind": "open"},
                {**base, "question": "Is there a fracture?", "answer": "No.", "kind": "closed"},
                {**base, "question": "Can you segment the liver?", "answer": "It is [SEG].", "kind": "seg",
                 "mask": "masks/m.npy"},
            ]  # fmt: skip
        (out / f"qa_{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (out / "prepare.json").write_text(json.dumps({"dataset": "physionet", "size": size, "window": "brain"}))
    return out


def fit_argv(root: Path, source: Path, *extra: str) -> list[str]:
    return [
        "fit", "-c", str(REPO / "stages" / "stage3_finetune.yaml"), "-c", str(REPO / "stages" / "trainer" / "cpu.yaml"),
        "--model.init_from", str(source), "--data.roots", json.dumps([str(root)]), "--data.batch_size", "2",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def test_finetune_two_steps_from_the_official_directory(tmp_path: Path, monkeypatch) -> None:
    from m3d_lit.inference.loading import load_model
    from m3d_lit.models.official.files import load_weights

    source = KIT / "lamed_llama_seg"
    root = write_prepared(tmp_path / "data", [32, 64, 64])
    monkeypatch.chdir(tmp_path)
    assert main(fit_argv(root, source)) == 0
    loaded = load_model(tmp_path / "runs" / "stage3")
    model = loaded.model
    assert loaded.bundle.llm_path == str(source)
    lora = model.llm.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.1)
    official = load_weights(source)
    # frozen under stage 3's LoRA: the base LLM is the directory's, bit for bit
    base = model.llm.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
    assert torch.equal(base, official["model.layers.0.mlp.down_proj.weight"])
    # trained by the LM loss of every batch: vision and projector moved off the directory's weights, by
    # about the learning rate (AdamW's first steps move each weight by ~lr = 2e-5)
    for ours, theirs in (
        (model.vision.norm.weight, "model.vision_tower.vision_tower.norm.weight"),
        (model.perceiver.projector[0].weight, "model.mm_projector.projector.0.weight"),
    ):
        change = (ours.detach() - official[theirs]).abs().max()
        assert 0 < change < 1e-3
    # the fine-tuned model in M3D's layout (LoRA merged) computes what the checkpoint computes
    case = json.loads((KIT / "cases.json").read_text())["lamed_llama_seg"]["train_forward"]
    ids, attention = torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"])
    images = torch.stack([torch.from_numpy(np.load(KIT / v)) for v in case["volumes"]])
    assert main(["export", "--checkpoint", "runs/stage3", "--out", "m3d", "--format", "m3d"]) == 0
    exported = build_official_lamed(tmp_path / "m3d").eval()
    with torch.no_grad():
        ours, theirs = (m(images, ids, attention, full_logits=True)["logits"] for m in (model, exported))
    # merging LoRA into W changes only the fp32 rounding of W x + B A x (logits of order 10)
    assert (ours - theirs)[attention.bool()].abs().max() < 1e-4


def test_data_prepared_at_another_size_is_refused_with_the_size_to_use(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    root = write_prepared(tmp_path / "data", [32, 128, 128])
    monkeypatch.chdir(tmp_path)
    assert main(fit_argv(root, KIT / "lamed_llama")) == 2
    err = capsys.readouterr().err
    assert "was prepared at size [32, 128, 128]" in err and "--size 32 64 64" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_llm_path_beside_an_official_init_from_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    root = write_prepared(tmp_path / "data", [32, 64, 64])
    monkeypatch.chdir(tmp_path)
    assert main(fit_argv(root, KIT / "lamed_phi3", "--model.llm_path", str(tmp_path))) == 2
    assert "drop --model.llm_path" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["data"]


def write_m3d_segvol(path: Path) -> dict:
    """The kit's SegVol weights in the layout M3D's `pretrain_seg_module` reads (`model.*`, plus text encoder)."""
    from m3d_lit.models.official.files import load_weights

    state = load_weights(KIT / "lamed_llama_seg")
    prefix = "model.seg_module."
    seg = {"model." + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    seg["model.text_encoder.embeddings.weight"] = torch.zeros(2, 3)
    torch.save(seg, path)
    return {"hidden_size": 96, "mlp_dim": 192, "num_layers": 2, "num_heads": 4, "decoder_depth": 2,
            "decoder_heads": 4, "decoder_mlp_dim": 128, "iou_head_hidden_dim": 32}  # fmt: skip


def test_segvol_weights_in_m3d_layout_compute_segvol_masks_only_with_the_full_decoder(tmp_path: Path) -> None:
    from m3d_lit.models.segmentation import SegmentationModule, load_segvol_weights

    sizes = write_m3d_segvol(tmp_path / "segvol.pth")
    case = json.loads((KIT / "cases.json").read_text())["lamed_llama_seg"]["cases"][0]
    image = torch.from_numpy(np.load(KIT / case["volume"]))[None]
    prompt = torch.from_numpy(np.load(KIT / case["seg_prompt"]))
    reference = torch.from_numpy(np.load(KIT / case["mask_logits"]))
    results = {}
    for full in (True, False):
        module = SegmentationModule((32, 64, 64), (4, 16, 16), full_decoder=full, **sizes).eval()
        loaded = load_segvol_weights(module, tmp_path / "segvol.pth")
        assert "model.text_encoder.embeddings.weight" in loaded["skipped"]
        with torch.no_grad():
            results[full] = (module(image, prompt) - reference).abs().max()
    assert results[True] < 1e-4  # fp32, as in test_official_lamed.py
    assert results[False] > 1e-2  # the trimmed decoder computes something else with the same weights


def test_stage3_starts_its_segmentation_module_from_segvol_path(tmp_path: Path, monkeypatch) -> None:
    from m3d_lit.inference.checkpoints import read_checkpoint as load_checkpoint

    sizes = write_m3d_segvol(tmp_path / "segvol.pth")
    root = write_prepared(tmp_path / "data", [32, 64, 64])
    overrides = {"segmentation": {**sizes, "full_decoder": True}}
    monkeypatch.chdir(tmp_path)
    argv = fit_argv(root, "null", "--model.preset", "tiny", "--model.segvol_path", str(tmp_path / "segvol.pth"),
                    "--model.overrides", json.dumps(overrides), "--trainer.max_steps", "1")  # fmt: skip
    assert main(argv) == 0
    state = load_checkpoint(tmp_path / "runs" / "stage3" / "version_0" / "checkpoints" / "last.ckpt")[
        "state_dict"
    ]
    source = torch.load(tmp_path / "segvol.pth", weights_only=True)
    for key in (
        "mask_decoder.iou_token.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    ):
        # one AdamW step at lr 2e-5 (after warm-up scaling) moves a weight by at most ~2e-5
        assert (state[f"model.segmentation.{key}"] - source[f"model.{key}"]).abs().max() < 1e-4
