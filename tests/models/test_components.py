"""Presets, registry, ViT, perceivers, tokenizers (CPU, small shapes, offline)."""

from __future__ import annotations

import pytest
import torch

from m3d_lit.models import registry, tokenizer
from m3d_lit.models.perceiver import SequencePoolPerceiver, SpatialPoolPerceiver
from m3d_lit.models.presets import PRESETS, STAGE_TRAINABLE, deep_merge, resolve
from m3d_lit.models.vision import ViT3D, grid_size


def test_resolve_deep_merges_without_touching_the_preset() -> None:
    config = resolve("tiny", {"llm": {"num_hidden_layers": 3}, "max_length": 128})
    assert config["llm"]["num_hidden_layers"] == 3
    assert config["llm"]["hidden_size"] == PRESETS["tiny"]["llm"]["hidden_size"]
    assert config["max_length"] == 128 and config["preset"] == "tiny"
    assert PRESETS["tiny"]["llm"]["num_hidden_layers"] == 2
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_resolve_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        resolve("huge")
    with pytest.raises(ValueError, match="unknown keys \\['visoin'\\]"):
        resolve("tiny", {"visoin": {}})


@pytest.mark.parametrize(
    ("preset", "patches", "visual"), [("tiny", 128, 32), ("small", 512, 64), ("paper", 2048, 256)]
)
def test_preset_token_counts(preset: str, patches: int, visual: int) -> None:
    config = PRESETS[preset]
    grid = grid_size(config["img_size"], config["patch_size"])
    with torch.device("meta"):
        perceiver = SpatialPoolPerceiver(grid, 8, 8, pool=config["perceiver"]["pool"])
    assert grid[0] * grid[1] * grid[2] == patches
    assert perceiver.num_tokens == visual
    assert visual < config["max_length"]


def test_stage_defaults_cover_the_stages() -> None:
    assert set(STAGE_TRAINABLE) == {1, 2, 3}
    assert STAGE_TRAINABLE[3]["llm"] == "lora" and STAGE_TRAINABLE[2]["vision"] == "frozen"


def test_registry_builds_and_refuses_unknown_or_duplicate() -> None:
    vit = registry.build(
        "vit3d",
        img_size=(8, 32, 32),
        patch_size=(4, 16, 16),
        hidden_size=32,
        mlp_dim=64,
        num_layers=1,
        num_heads=2,
    )
    assert isinstance(vit, ViT3D)
    with pytest.raises(ValueError, match="unknown backbone 'vit2d'"):
        registry.build("vit2d")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("vit3d", ViT3D)


def test_vit_shapes_and_cls() -> None:
    vit = ViT3D((8, 32, 32), (4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)
    tokens, cls = vit(torch.rand(3, 1, 8, 32, 32))
    assert tokens.shape == (3, 8, 32) and cls.shape == (3, 32)
    no_cls = ViT3D(
        (8, 32, 32), (4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=4, cls_token=False
    )
    tokens, cls = no_cls(torch.rand(1, 1, 8, 32, 32))
    assert tokens.shape == (1, 8, 32) and cls is None
    assert "patch_embedding.patch_embeddings.1.weight" in vit.state_dict()  # MONAI's key names
    with pytest.raises(ValueError, match=r"do not match B x \(1, 8, 32, 32\)"):
        vit(torch.rand(1, 1, 8, 32, 16))


def test_vit_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    vit = ViT3D((8, 32, 32), (4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4).double()
    x = torch.rand(2, 1, 8, 32, 32, dtype=torch.float64)
    vit(x)[0].square().sum().backward()
    plain = vit.blocks[0].attn.qkv.weight.grad.clone()
    vit.zero_grad()
    vit.gradient_checkpointing = True
    vit(x)[0].square().sum().backward()
    # float64: recomputing the forward may only reorder sums (~1e-16 relative); gradients are O(1-100)
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight.grad, plain, atol=1e-9, rtol=1e-9)


def test_vit_and_pool_reject_bad_sizes() -> None:
    with pytest.raises(
        ValueError, match=r"img_size \(32, 250, 256\) is not divisible by patch_size \(4, 16, 16\)"
    ):
        ViT3D((32, 250, 256), (4, 16, 16))
    with pytest.raises(
        ValueError, match=r"patch grid \(8, 4, 4\) is not divisible by the pool kernel \(3, 2, 2\)"
    ):
        SpatialPoolPerceiver((8, 4, 4), 8, 8, pool=(3, 2, 2))
    with pytest.raises(ValueError, match="num_patches 10 is not divisible by pool 4"):
        SequencePoolPerceiver(10, 8, 8, pool=4)


def test_spatial_pool_averages_grid_neighbours() -> None:
    perceiver = SpatialPoolPerceiver((2, 2, 2), 1, 1, pool=(1, 2, 2), proj="linear")
    torch.nn.init.ones_(perceiver.projector.weight)
    torch.nn.init.zeros_(perceiver.projector.bias)
    tokens = torch.arange(8.0).view(1, 8, 1)  # grid (d, h, w) raster order
    out = perceiver(tokens)
    # depth 0 holds 0..3 (mean 1.5), depth 1 holds 4..7 (mean 5.5)
    torch.testing.assert_close(out.flatten(), torch.tensor([1.5, 5.5]))
    seq = SequencePoolPerceiver(8, 1, 3, pool=4, proj="mlp")
    assert seq(tokens).shape == (1, 2, 3)


def test_llm_tokenizer_is_deterministic_and_compact() -> None:
    tokenizer._trained_bpe_json.cache_clear()
    first = tokenizer.build_llm_tokenizer()
    tokenizer._trained_bpe_json.cache_clear()
    second = tokenizer.build_llm_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    for token in tokenizer.LAMED_TOKENS:
        ids = first(token, add_special_tokens=False)["input_ids"]
        assert ids == [first.convert_tokens_to_ids(token)]
    text = "Is there intraparenchymal hemorrhage on the left side? Yes."
    assert len(first(text, add_special_tokens=False)["input_ids"]) <= 12
    answer = first("It is [SEG].", add_special_tokens=False)["input_ids"]
    assert first.decode(answer) == "It is [SEG]."
    assert first.pad_token_id is not None and first.eos_token_id != first.pad_token_id


def test_text_tokenizer_wordpiece_words() -> None:
    tok = tokenizer.build_text_tokenizer()
    ids = tok("Subdural hemorrhage with midline shift.")["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert {"subdural", "hemorrhage", "midline", "shift"} <= set(tokens)


def test_add_lamed_tokens_adds_pad_and_only_missing_tokens() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "[SEG]": 2, "yes": 3}
    base = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        eos_token="</s>",
        unk_token="<unk>",
    )
    added = tokenizer.add_lamed_tokens(base)
    assert len(added) == 4 and min(added) == 4  # <pad>, <im_patch>, <bx_start>, <bx_end>; [SEG] existed
    assert base.pad_token == "<pad>" and base.convert_tokens_to_ids("[SEG]") == 2
    assert tokenizer.add_lamed_tokens(base) == []


def test_tokenizer_directory_errors(tmp_path) -> None:
    from m3d_lit.errors import InputError

    with pytest.raises(InputError, match="tokenizer directory not found"):
        tokenizer.build_llm_tokenizer(tmp_path / "missing")
    with pytest.raises(InputError, match="no usable tokenizer files"):
        tokenizer.build_text_tokenizer(tmp_path)


def test_batchnorm_projector_runs_under_bf16_autocast_after_cast_for_training() -> None:
    from m3d_lit.models.lamed import cast_for_training
    from m3d_lit.models.perceiver import SpatialPoolPerceiver

    perceiver = SpatialPoolPerceiver((2, 4, 4), 16, 8, pool=2, proj="bn_mlp").to(torch.bfloat16)
    cast_for_training(perceiver)
    assert perceiver.projector[0].running_mean.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = perceiver(torch.randn(2, 32, 16, dtype=torch.bfloat16))
    assert out.shape == (2, 4, 8)


def test_token_batchnorm_takes_its_statistics_from_the_chosen_rows_only() -> None:
    from m3d_lit.models.perceiver import TokenBatchNorm

    torch.manual_seed(0)
    # float64: the scans' spread (0.01) is 300x below their mean, so the normalisation multiplies the
    # rounding of x - mean by 100; in float64 that leaves ~1e-13, in fp32 it reached 1e-5
    scans = 3.0 + 0.01 * torch.randn(3, 5, 8, dtype=torch.float64)
    batch = torch.cat([scans, torch.zeros(1, 5, 8, dtype=torch.float64)])  # an empty volume's tokens
    rows = torch.tensor([True, True, True, False])
    chosen, reference = TokenBatchNorm(8).double(), torch.nn.BatchNorm1d(8).double()
    with torch.no_grad():
        chosen.weight.uniform_(0.5, 2.0)
        chosen.bias.uniform_(-1.0, 1.0)
    reference.load_state_dict(chosen.state_dict())
    out = chosen(batch, stats_rows=rows)
    expected = reference(scans.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out[:3], expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(chosen.running_mean, reference.running_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(chosen.running_var, reference.running_var, atol=1e-12, rtol=0)
    assert out[3].abs().mean() > 50 * out[:3].abs().mean()  # normalised by the scans' statistics
    every, whole = TokenBatchNorm(8).double(), torch.nn.BatchNorm1d(8).double()
    every_out = every(batch, stats_rows=torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(every_out, whole(batch.transpose(1, 2)).transpose(1, 2), atol=1e-10, rtol=0)
    chosen.eval()
    # inference uses the running statistics: the very same arithmetic whatever the rows
    assert torch.equal(chosen(batch, stats_rows=rows), chosen(batch))


def test_random_llm_decoder_layers_can_take_their_own_init_std() -> None:
    from m3d_lit.models.llm import build_causal_lm

    config = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "initializer_range": 0.08}  # fmt: skip
    torch.manual_seed(0)
    model = build_causal_lm(config={**config, "layer_initializer_range": 0.02})
    layer = model.model.layers[1]
    for weight in (layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight):
        assert abs(weight.std().item() - 0.02) < 0.002
    assert abs(model.lm_head.weight.std().item() - 0.08) < 0.004
    assert abs(model.model.embed_tokens.weight.std().item() - 0.08) < 0.004
    assert "layer_initializer_range" not in model.config.to_dict()
    torch.manual_seed(0)
    plain = build_causal_lm(config=config)
    assert abs(plain.model.layers[1].self_attn.q_proj.weight.std().item() - 0.08) < 0.004
