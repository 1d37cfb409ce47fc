"""The atomic file writers and the typed model configuration."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from m3d_lit import atomic
from m3d_lit.errors import InputError
from m3d_lit.models.config import LLMConfig, LoraConfig, LossConfig, ModelConfig, VisionConfig
from m3d_lit.models.presets import PRESETS, fingerprint_config, resolve


def test_writers_replace_the_target_and_leave_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    atomic.write_jsonl(tmp_path / "b.jsonl", [{"q": "é"}, {"q": 2}])
    assert (tmp_path / "b.jsonl").read_text(encoding="utf-8") == '{"q": "é"}\n{"q": 2}\n'
    atomic.save_npy(tmp_path / "c.npy", np.arange(3))
    assert np.load(tmp_path / "c.npy").tolist() == [0, 1, 2]
    atomic.torch_save({"w": torch.ones(2)}, tmp_path / "d.ckpt")
    assert torch.load(tmp_path / "d.ckpt", weights_only=True)["w"].sum() == 2
    atomic.write_bytes(tmp_path / "e.bin", b"xy")
    assert not list(tmp_path.rglob(atomic.TMP_PATTERN))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "e.bin").stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic.write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        atomic.write_json(target, {"a": float("nan")})
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert not list(tmp_path.glob(atomic.TMP_PATTERN))


def test_two_writers_of_one_target_get_different_temporaries(tmp_path: Path) -> None:
    with atomic.atomic_path(tmp_path / "a") as one, atomic.atomic_path(tmp_path / "a") as two:
        assert one != two and one.name.startswith(".a.tmp-")


def test_presets_are_typed_and_keep_their_dict_form() -> None:
    tiny = PRESETS["tiny"]
    assert isinstance(tiny, ModelConfig) and isinstance(tiny.llm, LLMConfig)
    assert tiny.llm.hidden_size == tiny["llm"]["hidden_size"] == 256
    assert tiny.lora == LoraConfig(r=16, alpha=32, dropout=0.1) and tiny.loss == LossConfig()
    # settings the presets leave out are not written: the dict form is the one checkpoints hashed
    assert set(tiny.to_dict()["loss"]) == {"w_dice", "w_bce"}
    assert "family" not in tiny.to_dict()["llm"] and "logit_scale" not in tiny.to_dict()["clip"]
    assert ModelConfig.from_dict(tiny.to_dict()) == tiny
    config = resolve("tiny", {"llm": {"family": "phi3", "sliding_window": 64}, "loss": {"w_dice": 2.0}})
    assert config.llm.family == "phi3" and config.llm.extra == {"sliding_window": 64}
    assert config.loss.w_dice == 2.0 and PRESETS["tiny"].loss.w_dice == 1.0


def test_fingerprint_dict_is_the_old_resolved_dict() -> None:
    overrides = {"llm": {"family": "llama"}, "loss": {"dice_smooth": "both"}}
    config = fingerprint_config("tiny", overrides)
    assert config["llm"]["family"] == "llama" and config["loss"]["dice_smooth"] == "both"
    assert config["preset"] == "tiny" and config["lora"] == {"r": 16, "alpha": 32, "dropout": 0.1}


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: VisionConfig(hidden_size=30, mlp_dim=8, num_layers=1, num_heads=4), "vision: hidden_size 30 is not divisible by num_heads 4"),
        (lambda: VisionConfig(hidden_size=0, mlp_dim=8, num_layers=1, num_heads=4), "vision.hidden_size: 0 must be a positive integer"),
        (lambda: LoraConfig(dropout=1.5), r"lora.dropout: 1.5 must be a number \[0.0, 1.0\)"),
        (lambda: LoraConfig(r="16"), "lora.r: '16' must be a positive integer"),
        (lambda: resolve("tiny", {"llm": {"num_attention_heads": 3}}), "llm: hidden_size 256 is not divisible by num_attention_heads 3"),
        (lambda: resolve("tiny", {"perceiver": {"proj": "mpl"}}), r"perceiver.proj: 'mpl' is not one of \['mlp', 'linear', 'bn_mlp'\]"),
        (lambda: resolve("tiny", {"clip": {"head": "bn"}}), r"clip.head: 'bn' is not one of \['linear', 'batchnorm'\]"),
        (lambda: ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "colour": 1}), r"model config: unknown keys \['colour'\]; known: .*"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_in_one_line(build, problem: str) -> None:
    with pytest.raises(InputError, match=f"^{problem}$"):
        build()


def test_one_collator_factory_for_both_models_and_the_declared_hand_over() -> None:
    from types import SimpleNamespace

    from m3d_lit.data.collate import ClipCollator, LMCollator, make_collator
    from m3d_lit.data.datamodules import BaseDataModule
    from m3d_lit.models.tokenizer import build_llm_tokenizer, build_text_tokenizer

    lamed = SimpleNamespace(
        tokenizer=build_llm_tokenizer(None), num_visual_tokens=4, max_length=32, img_size=[4, 8, 8]
    )
    collate = make_collator(lamed, generation=True)
    assert isinstance(collate, LMCollator) and collate.generation and collate.img_size == (4, 8, 8)
    clip = SimpleNamespace(text_tokenizer=build_text_tokenizer(None), max_length=64)
    assert isinstance(make_collator(clip, max_length=16), ClipCollator)
    assert make_collator(clip, max_length=16).max_length == 16
    with pytest.raises(ValueError, match="no generation mode"):
        make_collator(clip, generation=True)
    dm = BaseDataModule()
    dm.set_collator(collate)
    assert dm.collate_fn is collate
