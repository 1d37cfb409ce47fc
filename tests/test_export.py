"""`m3d-lit export`: the adapter, the components, and a merged LLM whose logits equal LaMed's with LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3d_lit.errors import InputError
from m3d_lit.export import export, main
from m3d_lit.models.tokenizer import LAMED_TOKENS
from m3d_lit.tasks import AlignTask, FinetuneTask

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
    """The keys `load_task` reads from a Lightning checkpoint."""
    name = f"{type(task).__module__}.{type(task).__qualname__}"
    state = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        "m3d_lit": {"task": name, "preprocessing": {"size": [8, 16, 16], "window": [40, 80]}},
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneTask, Path]:
    """A tiny stage-3 task whose LoRA and new token rows are far from their initial values."""
    torch.manual_seed(0)
    task = FinetuneTask(preset="tiny", overrides=TINY)
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


def test_merged_llm_equals_lamed_with_lora(trained: tuple[FinetuneTask, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task, checkpoint = trained
    out = export(checkpoint, tmp_path / "export", merge=True)
    assert not (tmp_path / "export.tmp").exists()
    ids = sample_ids(task.model)
    with torch.no_grad():
        expected = lamed_logits(task.model, ids)
        with task.model.llm.disable_adapter():
            without_lora = lamed_logits(task.model, ids)
        merged = AutoModelForCausalLM.from_pretrained(out / "llm", local_files_only=True).eval()
        got = merged(input_ids=ids).logits
    # the LoRA must matter, or equality would prove nothing about the merge
    assert (expected - without_lora).abs().max() > 1e-2
    assert got.shape == expected.shape
    # fp32 rounding of W + BA against W x + B(A x); a wrong merge is off by more than 1e-2 (above)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out / "llm", local_files_only=True)
    for token in LAMED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) == task.model.tokenizer.convert_tokens_to_ids(token)


def test_adapter_and_components_reload(trained: tuple[FinetuneTask, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    from m3d_lit.tasks.loading import load_task

    task, checkpoint = trained
    out = export(checkpoint, tmp_path / "export")
    assert not (out / "llm").exists()
    fresh, _ = load_task(checkpoint)
    fresh.model.llm = PeftModel.from_pretrained(fresh.model.llm.unload(), out / "adapter").eval()
    ids = sample_ids(task.model)
    with torch.no_grad():
        assert torch.allclose(lamed_logits(fresh.model, ids), lamed_logits(task.model, ids), atol=1e-6)
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
    assert manifest["config"]["img_size"] == [8, 16, 16] and manifest["merged"] is False
    assert manifest["lora"] == {"r": 16, "alpha": 32, "dropout": 0.1}
    assert manifest["preprocessing"] == {"size": [8, 16, 16], "window": [40, 80]}


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
    checkpoint = save_checkpoint(AlignTask(preset="tiny", overrides=TINY), tmp_path / "stage2.ckpt")
    with pytest.raises(InputError, match="without LoRA"):
        export(checkpoint, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.tmp").exists()


@pytest.mark.slow
def test_export_of_a_trained_checkpoint(stage3_checkpoint: Path, tmp_path: Path) -> None:
    """The same through `m3d-lit export` on a checkpoint that Lightning wrote after real training steps."""
    from transformers import AutoModelForCausalLM

    from m3d_lit.tasks.loading import load_task

    assert main(["--checkpoint", str(stage3_checkpoint), "--out", str(tmp_path / "export"), "--merge"]) == 0
    task, _ = load_task(stage3_checkpoint)
    ids = sample_ids(task.model)
    with torch.no_grad():
        expected = lamed_logits(task.model, ids)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "llm", local_files_only=True)
        got = merged.eval()(input_ids=ids).logits
    # fp32 rounding of W + BA against W x + B(A x); a wrong merge is off by more than 1e-2 (above)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
