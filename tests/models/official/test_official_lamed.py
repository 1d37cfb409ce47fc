"""Official M3D-LaMed directories load and compute what the official code computed (the parity kit).

`../shared/data/m3d_official/` holds tiny random-weight LamedLlama / LamedPhi3 / [SEG] models saved by
the official code and that code's outputs (its README says how they were made). Tolerances: the kit's
own re-runs agree to 0.0 on one thread and to 1.6e-6 on two, and an independent fp32 implementation
(other kernels, other summation order: SDPA vs. explicit attention, reshape-mean vs. avg_pool3d) was
measured here within 2.1e-6 on logits (up to 3 in size), 2.4e-7 on mask logits (up to 0.23) and 1.2e-5
on the rigged seg model's training logits (up to 26, i.e. 5e-7 relative); 1e-4 (the issue's bound)
leaves a wide margin. Greedy choices are far from ties (the kit's
smallest top-1/top-2 margin is 8e-4), so ids and texts must be equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED

from m3d_lit.cli import main
from m3d_lit.data.collate import LMCollator
from m3d_lit.errors import InputError
from m3d_lit.models.official.lamed import build_official_lamed

KIT = SHARED / "data" / "m3d_official"
pytestmark = pytest.mark.skipif(not KIT.is_dir(), reason=f"parity kit not found at {KIT}")
CASES = json.loads((KIT / "cases.json").read_text()) if KIT.is_dir() else {}
LM_MODELS = ("lamed_llama", "lamed_phi3")


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: build_official_lamed(KIT / name).eval() for name in (*LM_MODELS, "lamed_llama_seg")}


def _volume(rel: str) -> torch.Tensor:
    return torch.from_numpy(np.load(KIT / rel))


def _items(cases: list[dict]) -> list[dict]:
    return [
        {"id": str(c["case"]), "image": _volume(c["volume"]), "question": c["question"], "answer": "",
         "kind": "open", "mask": None, "dataset": "kit"}
        for c in cases
    ]  # fmt: skip


def _collate(model, generation: bool = True) -> LMCollator:
    return LMCollator(model.tokenizer, model.num_visual_tokens, model.max_length, model.img_size, generation)


@pytest.mark.parametrize("name", (*LM_MODELS, "lamed_llama_seg"))
def test_prompt_ids_are_the_official_ones(models: dict, name: str) -> None:
    model = models[name]
    assert model.num_visual_tokens == CASES["proj_out_num"]
    for case in CASES[name]["cases"]:
        batch = _collate(model)(_items([case]))
        assert batch["input_ids"][0].tolist() == case["prompt_ids"]


@pytest.mark.parametrize("name", LM_MODELS)
def test_vision_and_projector_features_match(models: dict, name: str) -> None:
    model = models[name]
    for feats in CASES[name]["volume_features"]:
        with torch.no_grad():
            patches, _ = model.vision(_volume(feats["volume"])[None])
            visual = model.perceiver(patches)
        # two ViT layers + LayerNorm in fp32: measured 1.7e-6 on values of order 1
        assert (patches - torch.from_numpy(np.load(KIT / feats["vision_tower_features"]))).abs().max() < 1e-5
        assert (visual - torch.from_numpy(np.load(KIT / feats["projector_features"]))).abs().max() < 1e-5


@pytest.mark.parametrize("name", LM_MODELS)
def test_teacher_forced_logits_and_loss_match(models: dict, name: str) -> None:
    model = models[name]
    for case in CASES[name]["cases"]:
        ids = torch.tensor([case["full_ids"]])
        labels = ids.clone()
        labels[:, : case["label_mask_len"]] = -100
        with torch.no_grad():
            out = model(
                _volume(case["volume"])[None], ids, torch.ones_like(ids), labels=labels, full_logits=True
            )
        reference = torch.from_numpy(np.load(KIT / case["teacher_forced_logits"]))
        assert (out["logits"] - reference).abs().max() < 1e-4, f"case {case['case']}"
        assert abs(float(out["lm_loss"]) - case["teacher_forced_loss"]) < 1e-5


@pytest.mark.parametrize("name", LM_MODELS)
def test_greedy_generation_equals_official_one_by_one_and_in_a_batch(models: dict, name: str) -> None:
    from m3d_lit.inference.predictor import Predictor
    from m3d_lit.inference.records import prediction_records

    model, cases = models[name], CASES[name]["cases"]
    for case in cases:
        batch = _collate(model)(_items([case]))
        out = model.generate(batch["images"], batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
        assert out["ids"][0] == case["generated_ids"]
        assert out["texts"][0] == case["generated_text"]
    # eval's path: left-padded batches of prompts of different lengths, through the Predictor
    predictor = Predictor(model, max_new_tokens=12)
    records = list(prediction_records(predictor, _items(cases), batch_size=len(cases)))
    assert [r["prediction"] for r in records] == [c["generated_text"].strip() for c in cases]


def test_ask_on_the_directory_answers_like_the_official_demo(capsys: pytest.CaptureFixture) -> None:
    for name in LM_MODELS:
        for case in CASES[name]["cases"]:
            argv = ["ask", "--checkpoint", str(KIT / name), "--volume", str(KIT / case["volume"]),
                    "--question", case["question"], "--max-new-tokens", "12", "--device", "cpu"]  # fmt: skip
            assert main(argv) == 0
            assert capsys.readouterr().out.splitlines()[0] == case["generated_text"].strip()


def test_seg_model_masks_match_and_a_first_token_seg_still_gets_its_mask(models: dict) -> None:
    model, cases = models["lamed_llama_seg"], CASES["lamed_llama_seg"]["cases"]
    for case in cases:
        batch = _collate(model)(_items([case]))
        out = model.generate(batch["images"], batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
        assert out["ids"][0] == case["generated_ids"]
        assert out["texts"][0] == case["generated_text"]
        logits = out["seg_logits"][0]
        assert logits is not None and bool(torch.isfinite(logits).all())
        if case["mask_logits_all_neg_inf"]:
            # the official generate drops a [SEG] that is the first new token; m3d-lit does not
            assert case["generated_ids"][0] == CASES["lamed_llama_seg"]["seg_token_id"]
            continue
        reference = torch.from_numpy(np.load(KIT / case["mask_logits"]))[0]
        assert (logits - reference).abs().max() < 1e-4
        assert torch.equal(logits > 0, reference > 0)


def test_ask_writes_the_seg_mask(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    case = CASES["lamed_llama_seg"]["cases"][0]
    out = tmp_path / "mask.npy"  # an .npy mask stays on the model's grid (1 x D x H x W)
    argv = ["ask", "--checkpoint", str(KIT / "lamed_llama_seg"), "--volume", str(KIT / case["volume"]),
            "--question", case["question"], "--max-new-tokens", "12", "--mask-out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == "liver [SEG]"
    reference = np.load(KIT / case["mask_logits"])[0] > 0
    assert np.array_equal(np.load(out).astype(bool), reference)


def test_training_forward_losses_match(models: dict) -> None:
    model, case = models["lamed_llama_seg"], CASES["lamed_llama_seg"]["train_forward"]
    images = torch.stack([_volume(v) for v in case["volumes"]])
    masks = torch.stack(
        [torch.zeros(1, *CASES["image_size"]) if s == "zeros" else _volume(s).float() for s in case["segs"]]
    )
    ids, attention = torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"])
    with torch.no_grad():
        out = model(
            images,
            ids,
            attention,
            torch.tensor(case["labels"]),
            masks,
            masks.flatten(1).any(1),
            full_logits=True,
        )
    assert out["seg_rows"].tolist() == case["seg_ids_used"]
    for ours, theirs in (
        ("lm_loss", "loss_lm"),
        ("dice", "loss_dice"),
        ("bce", "loss_bce"),
        ("loss", "loss_total"),
    ):
        assert abs(float(out[ours]) - case[theirs]) < 1e-5, ours
    reference = torch.from_numpy(np.load(KIT / case["mask_logits"]))
    assert (out["seg_logits"] - reference).abs().max() < 1e-4
    # positions past the right padding are not compared: the official code gives them positions L..,
    # m3d-lit repeats the last real one; neither reaches a loss term
    logits = torch.from_numpy(np.load(KIT / case["logits"]))
    assert (out["logits"] - logits)[attention.bool()].abs().max() < 1e-4


def test_every_official_weight_is_used_and_rows_come_from_the_weights(models: dict) -> None:
    from m3d_lit.models.official.files import load_weights

    model = models["lamed_phi3"]
    assert model.llm.get_input_embeddings().num_embeddings == CASES["lamed_phi3"]["vocab_size"] == 575
    state = load_weights(KIT / "lamed_phi3")
    own = model.state_dict()
    embed = state["model.embed_tokens.weight"]
    assert torch.equal(own["llm.model.embed_tokens.weight"], embed)
    assert torch.equal(own["new_tokens.input_rows"], embed[[571, 572, 573, 574]])
    assert torch.equal(own["segmentation.mask_decoder.iou_token.weight"],
                       state["model.seg_module.mask_decoder.iou_token.weight"])  # fmt: skip
    assert set(model.unused_official_weights) == {
        k for k in state if k.startswith("model.seg_module.prompt_encoder.") and "pe_layer" not in k
        and "no_mask_embed" not in k
    }  # fmt: skip


# -- bad input -------------------------------------------------------------------------------------------


def _copy(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(KIT / name, out)
    for path in out.iterdir():
        path.chmod(0o644)
    return out


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _ask_fails(directory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    mask = tmp_path / "m.nii.gz"
    volume = KIT / "inputs" / "volume_0.npy"
    argv = ["ask", "--checkpoint", str(directory), "--volume", str(volume), "--question", "Where?",
            "--mask-out", str(mask)]  # fmt: skip
    assert main(argv) == 2
    assert not mask.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_directory_without_config_says_what_is_missing(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    assert "or an M3D-LaMed or M3D-CLIP directory with a config.json" in _ask_fails(folder, tmp_path, capsys)


def test_unknown_layout_and_unsupported_family_are_refused(tmp_path: Path, capsys) -> None:
    folder = _copy("lamed_llama", tmp_path)
    _edit_json(folder / "config.json", model_type="lamed_mistral")
    err = _ask_fails(folder, tmp_path, capsys)
    assert "lamed_mistral" in err and "lamed_llama" in err


def test_config_disagreeing_with_weights_names_the_tensor(tmp_path: Path, capsys) -> None:
    folder = _copy("lamed_llama", tmp_path)
    _edit_json(folder / "config.json", intermediate_size=100)
    assert "model.layers.0.mlp.down_proj.weight has shape (64, 172)" in _ask_fails(folder, tmp_path, capsys)


def test_tokenizer_without_the_m3d_tokens_is_refused(tmp_path: Path, capsys) -> None:
    folder = _copy("lamed_llama", tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"].pop("603")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "added_tokens.json").write_text(
        json.dumps({"<im_patch>": 600, "<bx_start>": 601, "<bx_end>": 602})
    )
    assert "tokenizer lacks the M3D tokens ['[SEG]']" in _ask_fails(folder, tmp_path, capsys)


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    folder = _copy("lamed_llama", tmp_path)
    for shard in folder.glob("model-*.safetensors"):
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(InputError, match="has no weights"):
        build_official_lamed(folder)


# -- export --format m3d -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("lamed_phi3", "lamed_llama_seg"))
def test_export_m3d_gives_back_the_official_tensors_bit_for_bit(name: str, tmp_path: Path, capsys) -> None:
    from m3d_lit.models.official.files import load_weights, read_config

    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(KIT / name), "--out", str(out), "--format", "m3d"]) == 0
    source, written = load_weights(KIT / name), load_weights(out)
    assert sorted(written) == sorted(source)
    for key, value in source.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
    assert read_config(out) == read_config(KIT / name)
    for file in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "generation_config.json"):
        assert (out / file).read_bytes() == (KIT / name / file).read_bytes()
    assert not (tmp_path / "out.tmp").exists()


def test_export_m3d_refuses_a_model_not_built_from_an_official_directory(stage3_checkpoint, tmp_path) -> None:
    from m3d_lit.commands.export import export

    with pytest.raises(InputError, match="not built from an official M3D-LaMed directory"):
        export(stage3_checkpoint, tmp_path / "out", format="m3d")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_dice_smoothing_the_denominator_only_is_m3ds() -> None:
    from m3d_lit.losses.segmentation import dice_loss

    half = torch.zeros(1, 4, dtype=torch.float64)  # sigmoid(0) = 0.5 on 4 voxels
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    # |p t| = 1, |p| + |t| = 4: M3D 1 - 2 / 5, m3d-lit's own 1 - 3 / 5
    assert float(dice_loss(half, target, smooth_numerator=False)) == pytest.approx(0.6, abs=1e-12)
    assert float(dice_loss(half, target)) == pytest.approx(0.4, abs=1e-12)
    empty = torch.full((1, 4), -1e4, dtype=torch.float64)
    assert float(dice_loss(empty, torch.zeros_like(empty), smooth_numerator=False)) == 1.0


@pytest.mark.parametrize("name", LM_MODELS)
def test_eval_command_on_the_directory_in_batches(name: str, tmp_path: Path) -> None:
    cases = CASES[name]["cases"]
    (tmp_path / "images").mkdir()
    lines = []
    for case in cases:
        image = f"images/{case['case']}.npy"
        shutil.copy(KIT / case["volume"], tmp_path / image)
        lines.append({"id": str(case["case"]), "image": image, "question": case["question"],
                      "answer": case.get("answer_text", ""), "kind": "open", "dataset": "kit"})  # fmt: skip
    (tmp_path / "qa_test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["eval", "--checkpoint", str(KIT / name), "--data", str(tmp_path / "qa_test.jsonl"),
            "--out", str(tmp_path / "eval"), "--batch-size", "3", "--max-new-tokens", "12", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [c["generated_text"].strip() for c in cases]


def test_every_trainable_parameter_gets_a_gradient_in_stage_3() -> None:
    """DDP (find_unused_parameters off) needs it: SegVol's IoU head and extra hypernetworks feed no output."""
    from m3d_lit.models.presets import STAGE_TRAINABLE

    model = build_official_lamed(KIT / "lamed_llama_seg")
    model.set_trainable(STAGE_TRAINABLE[3], lora=model.config["lora"])
    case = CASES["lamed_llama_seg"]["train_forward"]
    images = torch.stack([_volume(v) for v in case["volumes"]])
    masks = torch.stack(
        [torch.zeros(1, *CASES["image_size"]) if s == "zeros" else _volume(s).float() for s in case["segs"]]
    )
    ids, labels = torch.tensor(case["input_ids"]), torch.tensor(case["labels"])
    out = model(images, ids, torch.tensor(case["attention_mask"]), labels, masks, masks.flatten(1).any(1))
    out["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert "segmentation.mask_decoder.iou_token.weight" in trainable
    assert [n for n, p in trainable.items() if p.grad is None] == []


def test_official_models_read_hu_scans_with_m3ds_plain_min_max(tmp_path: Path) -> None:
    """An official model was trained on volumes min-maxed over their whole range (window `none`), not on
    m3d-lit's brain window: `ask`, the app and `embed` give it a NIfTI in that convention."""
    import nibabel as nib

    from m3d_lit.app.engine import Engine
    from m3d_lit.commands.ask import ask
    from m3d_lit.data.preprocess import load_and_preprocess
    from m3d_lit.inference.loading import load_model
    from m3d_lit.inference.predictor import Predictor

    hu = np.full((48, 80, 80), -1000.0, np.float32)
    hu[8:40, 10:70, 10:70] = np.linspace(-200.0, 1500.0, 32 * 60 * 60, dtype=np.float32).reshape(32, 60, 60)
    scan = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(scan))
    answer = ask(Predictor.load(KIT / "lamed_llama", max_new_tokens=2), scan, "What is shown?")
    size = tuple(answer.prepared.image.shape[1:])
    plain = load_and_preprocess(scan, size=size, window="none").image
    assert not np.array_equal(plain, load_and_preprocess(scan, size=size, window="brain").image)
    np.testing.assert_array_equal(answer.prepared.image, plain)
    assert Engine(KIT / "lamed_llama", max_new_tokens=2).window == "none"
    assert load_model(KIT / "clip").bundle.scan_window() == "none"


def test_eval_refuses_data_prepared_with_another_window_than_the_model_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Data `prepare`d with the brain window, given to an official model (M3D's plain min-max): refused."""
    case = CASES["lamed_llama"]["cases"][0]
    (tmp_path / "images").mkdir()
    shutil.copy(KIT / case["volume"], tmp_path / "images" / "0.npy")
    line = {"id": "0", "image": "images/0.npy", "question": case["question"], "answer": "x", "kind": "open"}
    (tmp_path / "qa_test.jsonl").write_text(json.dumps(line) + "\n")
    settings = {"dataset": "cq500", "size": [32, 64, 64], "window": "brain", "dtype": "float16"}
    (tmp_path / "prepare.json").write_text(json.dumps(settings))
    argv = ["eval", "--checkpoint", str(KIT / "lamed_llama"), "--data", str(tmp_path / "qa_test.jsonl"),
            "--out", str(tmp_path / "eval"), "--max-new-tokens", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert (
        "was prepared with window 'brain'; this model reads scans with window 'none'"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "eval").exists()
    settings["window"] = "none"
    (tmp_path / "prepare.json").write_text(json.dumps(settings))
    assert main(argv) == 0


def test_overrides_beside_an_official_directory_are_refused_not_ignored() -> None:
    from m3d_lit.models.build import build_lamed

    with pytest.raises(InputError, match=r"overrides: .* would be ignored: an M3D-LaMed directory"):
        build_lamed("tiny", {"llm": {"num_hidden_layers": 1}}, llm_path=KIT / "lamed_llama")
