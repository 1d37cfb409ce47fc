"""M3D-CLIP from an official directory: equality with the official code's outputs, `m3d-lit embed`, bad input.

The reference outputs come from the fixture kit (`shared/data/m3d_official`, made with the official code).
Tolerances: the features are unit vectors (entries ~0.1) computed through two ViT and two BERT layers in
fp32; float32 rounding (eps 6e-8) accumulated over sums of at most 1024 terms in any order stays two
orders below the 1e-5 bound on features, and the logits (scale 2.66 x a cosine) below 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, built

from m3d_lit import cli
from m3d_lit.errors import InputError
from m3d_lit.models.official.files import load_weights

KIT = SHARED / "data" / "m3d_official"
pytestmark = pytest.mark.skipif(not (KIT / "cases.json").is_file(), reason="M3D fixture kit not present")
FEATURE_TOL, LOGIT_TOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def case() -> dict:
    return json.loads((KIT / "cases.json").read_text())["clip"]


@pytest.fixture(scope="module")
def model():
    from m3d_lit.models.official.clip import load_m3d_clip

    return load_m3d_clip(KIT / "clip")


def _ref(case: dict, key: str) -> np.ndarray:
    return np.load(KIT / case[key]).astype(np.float64)


def _features(model, case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.from_numpy(np.load(KIT / v)) for v in case["volumes"]])
    tokens = model.text_tokenizer(case["texts"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        image, text, scale = model(images, tokens["input_ids"], tokens["attention_mask"])
    return image, text, scale.detach()


def test_tokenizer_gives_the_recorded_ids(model, case: dict) -> None:
    for text, ids in zip(case["texts"], case["text_input_ids"]):
        assert model.text_tokenizer(text)["input_ids"] == ids


def test_loader_reproduces_official_embeddings_and_logits(model, case: dict) -> None:
    image, text, scale = _features(model, case)
    assert model.scale_mode == "direct" and scale.item() == pytest.approx(case["logit_scale"], abs=0)
    assert np.abs(image.double().numpy() - _ref(case, "image_features")).max() < FEATURE_TOL
    assert np.abs(text.double().numpy() - _ref(case, "text_features")).max() < FEATURE_TOL
    logits = (scale * image @ text.T).double().numpy()
    assert np.abs(logits - _ref(case, "logits_per_image")).max() < LOGIT_TOL
    # the official forward returns the symmetrised matrix; the same numbers give it
    assert np.abs((logits + logits.T) / 2 - _ref(case, "forward_logits")).max() < LOGIT_TOL
    # stage 1's loss with the official scale is the official training loss (log-sum-exp of 3 logits ~ 1)
    from m3d_lit.losses.contrastive import clip_loss

    assert clip_loss(image, text, scale).item() == pytest.approx(case["forward_loss"], abs=FEATURE_TOL)


def test_embed_command_reproduces_official_outputs(case: dict, tmp_path: Path) -> None:
    out = tmp_path / "emb.json"
    volumes = [str(KIT / v) for v in case["volumes"]]
    argv = ["embed", "--checkpoint", str(KIT / "clip"), "--volume", *volumes, "--text", *case["texts"]]
    assert cli.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert sorted(result) == ["image", "logits", "text"]
    assert np.abs(np.array(result["image"]) - _ref(case, "image_features")).max() < FEATURE_TOL
    assert np.abs(np.array(result["text"]) - _ref(case, "text_features")).max() < FEATURE_TOL
    assert np.abs(np.array(result["logits"]) - _ref(case, "logits_per_image")).max() < LOGIT_TOL


def test_own_recipes_keep_the_exponentiated_scale() -> None:
    from m3d_lit.models.clip import MAX_LOGIT_SCALE, build_clip

    clip = build_clip("tiny")
    assert clip.scale_mode == "exp"
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    assert clip.scale().item() == MAX_LOGIT_SCALE
    with torch.no_grad():
        clip.logit_scale.fill_(np.log(20.0))
    assert clip.scale().item() == pytest.approx(20.0, rel=1e-6)


def _copy_kit(tmp_path: Path) -> Path:
    return Path(shutil.copytree(KIT / "clip", tmp_path / "clip"))


def test_pickled_and_sharded_weights_load_to_the_same_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = load_weights(KIT / "clip")
    names = sorted(state)
    pickled = tmp_path / "bin"
    pickled.mkdir()
    torch.save(state, pickled / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, keys in halves.items():
        save_file({k: state[k].contiguous() for k in keys}, str(sharded / file))
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder in (pickled, sharded):
        loaded = load_weights(folder)
        assert sorted(loaded) == names
        assert all(torch.equal(loaded[k], state[k]) for k in names)
    (sharded / "b.safetensors").unlink()
    with pytest.raises(InputError, match="b.safetensors: is named in model.safetensors.index.json"):
        load_weights(sharded)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _bad_dirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    layers, wide, bert, noweights = (_copy_kit(tmp_path / n) for n in ("layers", "wide", "bert", "noweights"))
    _edit_json(layers / "config.json", num_layers=3)
    _edit_json(wide / "config.json", hidden_size=128, mlp_dim=256)
    _edit_json(bert / "bert" / "config.json", intermediate_size=100)
    (noweights / "model.safetensors").unlink()
    (tmp_path / "empty").mkdir()
    return {
        "empty": (tmp_path / "empty", "M3D-CLIP directory with a config.json"),
        "lamed": (KIT / "lamed_llama", "not M3D-CLIP"),
        "layers": (layers, "vision_encoder.blocks.2.attn.qkv.weight"),
        "wide": (wide, "vision_encoder.patch_embedding.patch_embeddings.1.weight"),
        "bert": (bert, "language_encoder.encoder.layer.0.intermediate.dense.weight"),
        "noweights": (noweights, "has no weights: expected one of model.safetensors"),
    }


def test_bad_directories_get_one_line_exit_2_and_nothing_written(tmp_path: Path, capsys) -> None:
    volume = str(KIT / "inputs" / "volume_0.npy")
    for name, (directory, expected) in _bad_dirs(tmp_path).items():
        out = tmp_path / f"{name}.json"
        argv = ["embed", "--checkpoint", str(directory), "--volume", volume, "--text", "a", "--out", str(out)]
        assert cli.main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err and str(directory) in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".{name}.json.*")), name


def test_released_layout_without_bert_folder_reads_bert_sizes_from_the_weights(tmp_path: Path) -> None:
    from m3d_lit.models.official.clip import m3d_clip_config
    from m3d_lit.models.official.files import read_config

    directory = _copy_kit(tmp_path)
    shutil.rmtree(directory / "bert")
    _edit_json(directory / "config.json", language_model_name_or_path="bert-base-uncased")
    config = m3d_clip_config(directory, read_config(directory), load_weights(directory))
    text = config["text"]
    assert (text["vocab_size"], text["hidden_size"], text["num_hidden_layers"]) == (531, 96, 2)
    assert (text["intermediate_size"], text["max_position_embeddings"]) == (192, 512)
    assert text["num_attention_heads"] == 1  # BERT's 64-wide heads; bert-base (768 wide) gets its 12


@pytest.fixture(scope="module")
def m3d_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from m3d_lit.commands import synth

    base = tmp_path_factory.mktemp("m3d")
    argv = ["--out", str(base), "--cq500", "0", "--physionet", "0", "--m3d-data", "9"]
    assert synth.main([*argv, "--m3d-shape", "32", "64", "64"]) == 0
    return base / "M3D-Data"


def test_bench_retrieval_takes_an_m3d_clip_directory(m3d_data: Path, tmp_path: Path) -> None:
    from m3d_lit.commands import bench

    argv = ["--clip-checkpoint", str(KIT / "clip"), "--tasks", "retrieval", "--data", str(m3d_data)]
    assert bench.main([*argv, "--out", str(tmp_path), "--device", "cpu"]) == 0
    entry = json.loads((tmp_path / "metrics.json").read_text())["tasks"]["retrieval"]
    assert entry["status"] == "ok" and entry["n"] >= 2
    lines = (tmp_path / "retrieval" / "predictions.jsonl").read_text().splitlines()
    ranks = [json.loads(line)["i2t_rank"] for line in lines]
    # the same pairs through `embed`: the bench ranks each image's report as these logits do
    from m3d_lit.commands.embed import embed
    from m3d_lit.inference.loading import load_model

    pairs = json.loads((m3d_data / "M3D_Cap_npy" / "M3D_Cap.json").read_text())["test"]
    texts = [(m3d_data / p["text"]).read_text().strip() for p in pairs]
    logits = np.array(embed(load_model(KIT / "clip"), [m3d_data / p["image"] for p in pairs], texts)["logits"])
    expected = [int((row > row[i]).sum()) for i, row in enumerate(logits)]
    assert ranks == expected


@pytest.mark.slow
def test_embed_with_a_stage1_checkpoint_uses_its_own_scale(m3d_data: Path, tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from m3d_lit.data.datamodules import M3DCapDataModule
    from m3d_lit.tasks import ClipTask

    overrides = {"vision": {"num_layers": 1}, "text": {"num_hidden_layers": 1}}
    task = ClipTask(preset="tiny", overrides=overrides)
    cap = M3DCapDataModule(str(m3d_data), str(m3d_data / "M3D_Cap_npy" / "M3D_Cap.json"), batch_size=3)
    trainer = Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=cap)
    checkpoint = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(checkpoint)
    volumes = sorted(str(p) for p in (m3d_data / "M3D_Cap_npy").rglob("*.npy"))[:2]
    out = tmp_path / "emb.json"
    argv = ["embed", "--checkpoint", str(checkpoint), "--volume", *volumes, "--text", "a bleed", "no bleed"]
    assert cli.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    result = {k: np.array(v, dtype=np.float64) for k, v in json.loads(out.read_text()).items()}
    assert result["image"].shape[0] == 2 and result["text"].shape[0] == 2
    assert np.allclose(np.linalg.norm(result["image"], axis=1), 1.0, atol=1e-6)
    scale = float(np.exp(task.model.logit_scale.item()))  # `exp` mode; far below the clamp after one step
    assert np.abs(result["logits"] - scale * result["image"] @ result["text"].T).max() < 1e-4


CLIP_VISION = {"vision": {"hidden_size": 96, "mlp_dim": 192, "num_layers": 2, "num_heads": 4}}


def test_stage2_clip_path_refuses_other_sizes_and_a_second_vision_source(tmp_path: Path) -> None:
    from m3d_lit.tasks import AlignTask

    task = built(AlignTask(preset="tiny", clip_path=str(KIT / "clip")))  # tiny's ViT is 192 wide
    with pytest.raises(
        InputError, match=r"vision\.blocks\.0\.attn\.out_proj\.bias is \(96,\) there and \(192,\) here"
    ):
        task.load_clip_vision(str(KIT / "clip"))
    with pytest.raises(InputError, match="would both start the vision encoder"):
        AlignTask(preset="tiny", clip_path=str(KIT / "clip"), init_from="checkpoints/stage1/last.ckpt")
    with pytest.raises(InputError, match="has no config.json"):
        built(AlignTask(preset="tiny", overrides=CLIP_VISION, clip_path=str(tmp_path))).load_clip_vision(
            str(tmp_path)
        )


@pytest.mark.slow
def test_stage2_starts_its_vision_encoder_from_m3d_clip(m3d_data: Path) -> None:
    from lightning.pytorch import Trainer

    from m3d_lit.data.datamodules import M3DCapDataModule
    from m3d_lit.tasks import AlignTask

    overrides = {**CLIP_VISION, "llm": {"num_hidden_layers": 1}}
    task = AlignTask(preset="tiny", overrides=overrides, clip_path=str(KIT / "clip"), log_examples=0)
    cap = M3DCapDataModule(str(m3d_data), str(m3d_data / "M3D_Cap_npy" / "M3D_Cap.json"), batch_size=2)
    trainer = Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=cap)
    weights = load_weights(KIT / "clip")
    own = task.model.vision.state_dict()  # stage 2 keeps the vision encoder frozen
    assert len(own) == sum(k.startswith("vision_encoder.") for k in weights)
    assert all(torch.equal(own[k], weights[f"vision_encoder.{k}"]) for k in own)
