"""`load_causal_lm` reads a local LLM directory one tensor at a time, straight into the training dtype on
the default device: what it builds must be exactly what transformers' `from_pretrained` builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from m3d_lit.errors import InputError
from m3d_lit.models.llm import build_causal_lm, load_causal_lm
from m3d_lit.models.official.files import iter_weights, weight_index

SIZES = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "eos_token_id": 1}  # fmt: skip


def _save(folder: Path, model_class: type, config_class: type, tie: bool = False, **saved) -> Path:
    torch.manual_seed(0)
    model_class(config_class(**SIZES, tie_word_embeddings=tie)).save_pretrained(folder, **saved)
    return folder


@pytest.mark.parametrize(
    "family, tie", [((LlamaForCausalLM, LlamaConfig), False), ((LlamaForCausalLM, LlamaConfig), True),
                    ((Phi3ForCausalLM, Phi3Config), False)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float64])
def test_loaded_llm_is_what_from_pretrained_builds(tmp_path: Path, family, tie: bool, dtype) -> None:
    folder = _save(tmp_path / "llm", *family, tie=tie)
    ours = load_causal_lm(folder, dtype)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    for key in ref:  # bit for bit, dtype included: both convert the same saved values once
        assert mine[key].dtype == ref[key].dtype and torch.equal(mine[key], ref[key]), key
    buffers, ref_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert buffers.keys() == ref_buffers.keys()
    assert all(torch.equal(buffers[k], ref_buffers[k]) for k in ref_buffers)  # rotary frequencies
    ids = torch.randint(2, SIZES["vocab_size"], (2, 5))
    assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert ours.training == theirs.training
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_sharded_directories_load_the_same(tmp_path: Path) -> None:
    single = _save(tmp_path / "one", LlamaForCausalLM, LlamaConfig)
    sharded = _save(tmp_path / "many", LlamaForCausalLM, LlamaConfig, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = (
        load_causal_lm(single, torch.bfloat16).state_dict(),
        load_causal_lm(sharded, torch.bfloat16).state_dict(),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_under_the_meta_device_nothing_is_read(tmp_path: Path) -> None:
    folder = _save(tmp_path / "llm", LlamaForCausalLM, LlamaConfig)
    (folder / "model.safetensors").write_bytes(b"not read")  # a skeleton needs only config.json
    with torch.device("meta"):
        model = build_causal_lm(folder, dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())


def test_weights_go_to_the_default_device_in_the_asked_dtype(tmp_path: Path) -> None:
    folder = _save(tmp_path / "llm", LlamaForCausalLM, LlamaConfig)
    saved = dict(iter_weights(folder))
    for name, tensor in iter_weights(folder, torch.float16, "cpu", names={"model.norm.weight"}):
        assert name == "model.norm.weight" and tensor.dtype == torch.float16
        assert torch.equal(tensor, saved[name].to(torch.float16))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: i.shape for k, i in weight_index(folder).items()
    }


def test_renamed_layouts_go_through_from_pretrained(tmp_path: Path) -> None:
    """A directory whose tensor names are not the model's own is left to transformers' own renaming."""
    from safetensors.torch import load_file, save_file

    folder = _save(tmp_path / "llm", LlamaForCausalLM, LlamaConfig)
    state = load_file(folder / "model.safetensors")
    save_file({**state, "model.extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    model = load_causal_lm(folder, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_a_truncated_weight_file_is_named(tmp_path: Path) -> None:
    folder = _save(tmp_path / "llm", LlamaForCausalLM, LlamaConfig)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="model.safetensors.*truncated"):
        load_causal_lm(folder, torch.float32)
