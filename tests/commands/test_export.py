"""`m3d-lit export`: the adapter, the components, and a merged LLM whose logits equal LaMed's with LoRA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import built
from safetensors.torch import load_file

from m3d_lit.commands.export import _write_merged, export, main
from m3d_lit.errors import InputError
from m3d_lit.tasks import AlignTask, FinetuneTask
from m3d_lit.tokens import LAMED_TOKENS

TINY = {
    "img_size": [8, 16, 16],
    "patch_size": [4, 8, 8],
    "max_length": 48,
    "vision": {"hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2},
    "llm": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "segmentation": {
        "hidden_size": 32,
        "mlp_dim": 64,
        "num_layers": 1,
        "num_heads": 2,
        "decoder_depth": 1,
        "decoder_heads": 2,
        "decoder_mlp_dim": 64,
    },
}


def save_checkpoint(task: AlignTask, path: Path) -> Path:
    """What Lightning saves of a task trained on one source prepared at 8 x 16 x 16 with the brain window."""
    task._data_record = ({"cq500": {"size": [8, 16, 16], "window": "brain"}}, "0123456789abcdef")
    state = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(state)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneTask, Path]:
    """A tiny stage-3 task whose LoRA and new token rows are far from their initial values."""
    torch.manual_seed(0)
    task = built(FinetuneTask(preset="tiny", overrides=TINY))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in task.model.llm.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would make the merge a no-op
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
        for rows in (task.model.new_tokens.input_rows, task.model.new_tokens.output_rows):
            rows.copy_(torch.randn(rows.shape, generator=gen))
    path = save_checkpoint(task, tmp_path_factory.mktemp("ckpt") / "stage3.ckpt")
    return task.eval(), path


def lamed_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    hidden, _ = model.decode(model.token_embeds(input_ids), torch.ones_like(input_ids), None)
    return model.logits(hidden)


def sample_ids(model) -> torch.Tensor:
    tok = model.tokenizer
    words = tok("Is there a hemorrhage on the left side?", add_special_tokens=False)["input_ids"]
    new = [tok.convert_tokens_to_ids(t) for t in LAMED_TOKENS]
    return torch.tensor([[tok.bos_token_id, *new, *words], [tok.bos_token_id, *words, *reversed(new)]])


def merged_in_float64(model, folder: Path, checkpoint: Path):
    """`model`'s LLM merged by m3d-lit's own merge code, in float64, saved and loaded back in float64."""
    from transformers import AutoModelForCausalLM

    _write_merged(copy.deepcopy(model).double(), folder, torch.float64, checkpoint)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, local_files_only=True).eval()


def merge_rounding_bounds(model) -> dict[str, torch.Tensor]:
    """Per-element bound on |fp32 merge - exact merge| of every LoRA-merged weight, by its merged key.

    In fp32, B @ A over r terms is off by at most r u |B||A| (u = 2^-24, the unit roundoff); scaling it
    and adding W round twice more, so W + s BA is off by at most u |W| + (r + 2) u s |B||A| + O(u^2).
    Twice that covers the O(u^2) terms, whatever order a CPU's kernel sums in.
    """
    from peft.tuners.lora import Linear as LoraLinear

    unit = 2.0**-24
    bounds = {}
    for name, module in model.llm.named_modules():
        if isinstance(module, LoraLinear):
            weight = module.base_layer.weight.detach().double().abs()
            lora_a = module.lora_A["default"].weight.detach().double().abs()
            lora_b = module.lora_B["default"].weight.detach().double().abs()
            scale, rank = module.scaling["default"], lora_a.shape[0]
            key = name.removeprefix("base_model.model.") + ".weight"
            bounds[key] = 2 * unit * (weight + (rank + 2) * scale * (lora_b @ lora_a))
    return bounds


def assert_export_is_the_merge(model, exported: Path, folder: Path, checkpoint: Path) -> None:
    """The exported fp32 merged LLM is the float64 merge rounded to fp32: LoRA weights within the
    rounding bound, every other weight (new token rows included) exactly."""
    from transformers import AutoModelForCausalLM

    reference = merged_in_float64(model, folder, checkpoint).state_dict()
    got = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).state_dict()
    assert got.keys() == reference.keys()
    bounds = merge_rounding_bounds(model)
    assert bounds and bounds.keys() <= got.keys()
    for key, value in got.items():
        assert value.dtype == torch.float32, key
        if key in bounds:
            assert ((value.double() - reference[key]).abs() <= bounds[key]).all(), key
        else:
            assert torch.equal(value.double(), reference[key]), key


def test_merged_llm_equals_lamed_with_lora(trained: tuple[FinetuneTask, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    task, checkpoint = trained
    out = export(checkpoint, tmp_path / "export", merge=True)
    assert not (tmp_path / "export.tmp").exists()
    ids = sample_ids(task.model)
    model64 = copy.deepcopy(task.model).double()
    with torch.no_grad():
        expected = lamed_logits(model64, ids)
        with model64.llm.disable_adapter():
            without_lora = lamed_logits(model64, ids)
        got = merged_in_float64(task.model, tmp_path / "merged64", checkpoint)(input_ids=ids).logits
    # the LoRA must matter, or equality would prove nothing about the merge
    assert (expected - without_lora).abs().max() > 1e-2
    assert got.shape == expected.shape
    # Both sides in float64 (unit roundoff 1.1e-16): W x + s B(A x) and (W + s BA) x differ by rounding
    # alone, measured 9e-16 on logits up to 16 (LoRA moves them by 17); a wrong merge is off by > 1e-2.
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    assert_export_is_the_merge(task.model, out / "llm", tmp_path / "reference", checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(out / "llm", local_files_only=True)
    for token in LAMED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) == task.model.tokenizer.convert_tokens_to_ids(token)


def test_adapter_and_components_reload(trained: tuple[FinetuneTask, Path], tmp_path: Path) -> None:
    from types import SimpleNamespace

    from peft import PeftModel

    from m3d_lit.inference.loading import load_model

    task, checkpoint = trained
    out = export(checkpoint, tmp_path / "export")
    assert not (out / "llm").exists()
    fresh = SimpleNamespace(model=load_model(checkpoint).model)
    fresh.model.llm = PeftModel.from_pretrained(fresh.model.llm.unload(), out / "adapter").eval()
    ids = sample_ids(task.model)
    with torch.no_grad():
        reloaded = lamed_logits(fresh.model.double(), ids)
        expected = lamed_logits(copy.deepcopy(task.model).double(), ids)
        with fresh.model.llm.disable_adapter():
            without = lamed_logits(fresh.model, ids)
    # the same fp32 weights computed in float64 by the same code: only float64 rounding (~1e-15) may differ,
    # while an adapter that lost a weight moves the logits by more than 1e-2
    assert (expected - without).abs().max() > 1e-2
    torch.testing.assert_close(reloaded, expected, atol=1e-10, rtol=0)
    model = task.model
    vision = load_file(out / "vision.safetensors")
    assert vision.keys() == model.vision.state_dict().keys()
    assert all(torch.equal(vision[k], v) for k, v in model.vision.state_dict().items())
    perceiver = load_file(out / "perceiver.safetensors")
    assert perceiver.keys() == model.perceiver.state_dict().keys()
    seg = load_file(out / "segmentation.safetensors")
    assert torch.equal(seg["seg_head.0.weight"], model.seg_head[0].weight)
    assert {k.split(".")[0] for k in seg} == {"segmentation", "seg_head"}
    rows = load_file(out / "new_tokens.safetensors")
    assert torch.equal(rows["output_rows"], model.new_tokens.output_rows)
    manifest = json.loads((out / "m3d_lit.json").read_text())
    bundle = manifest[
        "bundle"
    ]  # the checkpoint's record, so the export loads with it (test_inference_loading)
    assert bundle["config"]["img_size"] == [8, 16, 16] and manifest["merged"] is False
    assert bundle["lora"] == {"r": 16, "alpha": 32, "dropout": 0.1}
    assert bundle["preprocessing"] == {"cq500": {"size": [8, 16, 16], "window": "brain"}}


def test_existing_folder_needs_overwrite(trained: tuple[FinetuneTask, Path], tmp_path: Path) -> None:
    _, checkpoint = trained
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(InputError, match="already exists"):
        main(["--checkpoint", str(checkpoint), "--out", str(out)])
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--merge",
        "--dtype",
        "bfloat16",
        "--overwrite",
    ]
    assert main(argv) == 0
    assert not (out / "stale.txt").exists() and not (tmp_path / "export.old").exists()
    weights = load_file(out / "llm" / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}


def test_refuses_a_checkpoint_without_lora(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(built(AlignTask(preset="tiny", overrides=TINY)), tmp_path / "stage2.ckpt")
    with pytest.raises(InputError, match="without LoRA"):
        export(checkpoint, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.tmp").exists()


@pytest.mark.slow
def test_export_of_a_trained_checkpoint(stage3_checkpoint: Path, tmp_path: Path) -> None:
    """The same through `m3d-lit export` on a checkpoint that Lightning wrote after real training steps."""
    from m3d_lit.inference.loading import load_model

    assert main(["--checkpoint", str(stage3_checkpoint), "--out", str(tmp_path / "export"), "--merge"]) == 0
    model = load_model(stage3_checkpoint).model
    assert_export_is_the_merge(model, tmp_path / "export" / "llm", tmp_path / "reference", stage3_checkpoint)


def test_a_merged_export_loads_through_the_same_door(
    trained: tuple[FinetuneTask, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`ask --checkpoint EXPORT_DIR`: the export's bundle rebuilds the model, and it answers as the
    checkpoint does (both merge LoRA in fp32 the same way, so the weights are the same bits)."""
    import numpy as np

    from m3d_lit.cli import main as cli
    from m3d_lit.inference.predictor import Predictor

    _, checkpoint = trained
    merged = export(checkpoint, tmp_path / "merged", merge=True)
    from_export, from_checkpoint = Predictor.load(merged), Predictor.load(checkpoint)
    assert from_export.loaded.source.kind == "export"
    assert from_export.bundle.preprocessing == from_checkpoint.bundle.preprocessing
    ids = sample_ids(from_checkpoint.model)
    with torch.no_grad():
        assert torch.equal(lamed_logits(from_export.model, ids), lamed_logits(from_checkpoint.model, ids))
    np.save(tmp_path / "scan.npy", np.random.default_rng(0).random((1, 8, 16, 16)).astype(np.float32))
    answers = []
    for source in (merged, checkpoint):
        argv = ["ask", "--checkpoint", str(source), "--volume", str(tmp_path / "scan.npy"),
                "--question", "Is there a fracture?", "--max-new-tokens", "4"]  # fmt: skip
        assert cli(argv) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and "P(Yes) = " in answers[0]


def test_an_adapter_export_loads_with_its_base_llm_and_is_refused_without(
    trained: tuple[FinetuneTask, Path], tmp_path: Path
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from m3d_lit.inference.loading import load_model
    from m3d_lit.models.tokenizer import build_llm_tokenizer

    # the tiny model's LLM is random: an adapter alone does not hold it
    _, checkpoint = trained
    with pytest.raises(InputError, match="adapter of a randomly initialised LLM.*--merge"):
        load_model(export(checkpoint, tmp_path / "random"))
    # a base LLM in a directory (as LLaMA-2 is), LoRA trained over it
    tokenizer, llm = build_llm_tokenizer(None), tmp_path / "llm"
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(**{**TINY["llm"], "vocab_size": len(tokenizer)})).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    task = FinetuneTask(
        preset="tiny", overrides={k: v for k, v in TINY.items() if k != "llm"}, llm_path=str(llm)
    )
    task.configure_model()
    with torch.no_grad():
        for name, param in task.model.llm.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)
    adapter = export(save_checkpoint(task, tmp_path / "stage3.ckpt"), tmp_path / "adapter")
    assert not (adapter / "llm").exists()
    loaded, direct = load_model(adapter), load_model(tmp_path / "stage3.ckpt")
    assert loaded.bundle.llm_path == str(llm.resolve())
    ours, theirs = loaded.model.state_dict(), direct.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
