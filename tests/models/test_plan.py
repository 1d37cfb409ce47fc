"""`m3d-lit plan`: parameter counts on the meta device, measured activations and their scaling, FLOPs."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
from conftest import SHARED
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from m3d_lit.commands import plan as plan_command
from m3d_lit.models import plan as P
from m3d_lit.models.build import build_lamed
from m3d_lit.models.plan_advice import fit_advice
from m3d_lit.models.presets import PRESETS

# A tiny LLM whose widths (and vocab) halve cleanly, to check the width scaling of the measurement.
_HALVABLE = {
    "llm": {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512, "vocab_size": 2048}
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CPUs: two threads are much slower on small ops here
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paper_mb2() -> dict:
    return P.plan(P.PlanSettings(preset="paper", stage=3, gpu_mem=24, micro_batch=2))


def test_paper_stage3_fits_24gb_at_micro_batch_2(paper_mb2):
    assert paper_mb2["fits"], plan_command.format_plan(paper_mb2)
    assert paper_mb2["max_micro_batch"] >= 2
    memory = paper_mb2["memory_gib"]
    # LLaMA-2-7B in bf16 only: 6.74e9 x 2 bytes; no fp32 copy.
    assert 12.4 < memory["frozen_weights"] < 12.8
    assert memory["adamw_moments_fp32"] == pytest.approx(2 * memory["trainable_fp32"])
    for part in ("vision", "llm", "segmentation"):
        assert memory[f"{part}_activations"] > 0.0
    assert 15 < paper_mb2["flops"]["train_model_tflop_per_sample"] < 25


def test_paper_stage3_micro_batch_targets_of_issue_32():
    """What a 24 GiB card holds once the loss keeps no full logits, LoRA and the ViT blocks recompute
    their cheap parts and the segmentation encoder can be checkpointed (before: 2 and 1)."""
    llm = P.plan(P.PlanSettings(preset="paper", stage=3, gpu_mem=24, checkpointing="llm"))
    assert llm["max_micro_batch"] >= 4, plan_command.format_plan(llm)
    vision = P.plan(P.PlanSettings(preset="paper", stage=3, gpu_mem=24, checkpointing="vision", zero=2))
    assert vision["max_micro_batch"] >= 2, plan_command.format_plan(vision)
    # without the LLM recomputed a sample costs less compute: the point of fitting 2
    flops = (r["flops"]["train_hardware_tflop_per_sample"] for r in (vision, llm))
    assert next(flops) < 0.8 * next(flops)


def test_segmentation_checkpointing_keeps_block_inputs_only():
    settings = P.PlanSettings(preset="paper", stage=3, micro_batch=1, checkpointing="llm")
    act = P.measure_activations(settings)
    plain = P._activation_bytes(act, settings, 0.0)
    both = P._activation_bytes(
        act, P.PlanSettings(preset="paper", micro_batch=1, checkpointing="llm,seg"), 0.0
    )
    assert both["segmentation_activations"] < 0.5 * plain["segmentation_activations"]
    assert both["llm_activations"] == plain["llm_activations"]
    assert both["transient"] >= plain["transient"]


def test_paper_counts_match_describe(paper_mb2):
    from m3d_lit.models.describe import describe

    described = describe("paper", 3)
    assert paper_mb2["params"]["trainable"] == described["trainable_params"]
    assert paper_mb2["params"]["frozen"] + paper_mb2["params"]["trainable"] == described["total_params"]


def test_paper_naive_settings_do_not_fit(paper_mb2):
    naive = P.PlanSettings(micro_batch=1, frozen_dtype="fp32", full_embeddings=True, checkpointing="none")
    result = P.plan(naive)
    assert not result["fits"]
    assert result["memory_gib"]["frozen_weights"] > 2 * paper_mb2["memory_gib"]["frozen_weights"] - 1
    assert result["params"]["trainable"] > paper_mb2["params"]["trainable"] + 2 * 32000 * 4096 - 10


def test_checkpointing_keeps_only_layer_inputs():
    settings = P.PlanSettings(preset="tiny", micro_batch=1, checkpointing="none")
    act = P.measure_activations(settings)
    layers = PRESETS["tiny"]["llm"]["num_hidden_layers"]
    assert act["llm_layer"] == pytest.approx(layers * act["llm_layer_full"])
    # A layer keeps far more than its input (norms, q/k/v, MLP, LoRA): checkpointing must shrink it.
    assert act["llm_layer_input"] * 4 < act["llm_layer_full"]
    full = P._activation_bytes(act, settings, 0.0)
    ckpt = P._activation_bytes(act, P.PlanSettings(preset="tiny", micro_batch=1, checkpointing="llm"), 0.0)
    assert ckpt["llm_activations"] < full["llm_activations"]
    assert ckpt["transient"] > full["transient"]


def test_width_scaling_matches_a_full_width_measurement():
    full = P.measure_activations(P.PlanSettings(preset="tiny", overrides=_HALVABLE, width_divisor=1))
    half = P.measure_activations(P.PlanSettings(preset="tiny", overrides=_HALVABLE, width_divisor=2))
    assert half["width_divisor"] == 2
    for key in ("llm_layer", "llm_layer_input"):
        assert half[key] == pytest.approx(full[key], rel=0.1), key
    # the loss's index tensors do not scale with width: an overestimate, small next to tokens x vocab
    assert full["llm_other"] <= half["llm_other"] < 1.25 * full["llm_other"]


def test_analytic_flops_match_flop_counter_on_tiny():
    settings = P.PlanSettings(preset="tiny", seg_share=1.0)
    analytic = sum(P.flops_per_sample(settings)["forward"].values())
    torch.manual_seed(0)
    model = build_lamed("tiny").eval().requires_grad_(False)
    batch = P.synthetic_batch(model, 1, model.max_length, seg=True)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # math attention: countable matmuls
        model(**batch)
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.15)


def test_synthetic_batch_rows_fit_the_model():
    model = build_lamed("tiny")
    batch = P.synthetic_batch(model, 2, 64, seg=True)
    assert batch["input_ids"].shape == (2, 64)
    assert int((batch["input_ids"][0] == model.im_patch_id).sum()) == model.num_visual_tokens
    assert bool((batch["input_ids"] == model.seg_id).any(1).all())
    assert batch["images"].shape == (2, 1, *model.img_size)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="--stage: 1"):
        P.PlanSettings(stage=1)
    with pytest.raises(ValueError, match="--micro-batch: 0 must be >= 1"):
        P.PlanSettings(micro_batch=0)
    with pytest.raises(ValueError, match="--checkpointing: 'llm,lora' is not none, all, or"):
        P.PlanSettings(checkpointing="llm,lora")
    with pytest.raises(ValueError, match="--width-divisor: 3 must divide"):
        P.measure_activations(P.PlanSettings(width_divisor=3))


def test_cli_prints_the_table(capsys):
    assert plan_command.main(["--preset", "tiny", "--micro-batch", "1", "--gpu-mem", "2"]) == 0
    out = capsys.readouterr().out
    assert "frozen_weights" in out and ": fits" in out and "training TFLOP/sample" in out


def test_eight_gib_names_what_micro_batch_1_needs_and_why_nothing_fits(capsys):
    """The paper's frozen LLaMA-2-7B alone is 12.55 GiB: no setting plan covers fits 8 GiB, and the
    line says so, with the least memory micro-batch 1 can take and the sharding that plan leaves out."""
    assert plan_command.main(["--gpu-mem", "8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"largest micro-batch that fits: 0 \(micro-batch 1 needs \d+\.\d\d GiB\)", out), out
    line = next(line for line in out.splitlines() if "nothing plan covers" in line)
    least = float(re.search(r"and (\d+\.\d\d) GiB at the least", line).group(1))
    assert 12.55 < least < 24 and "checkpointing all, zero 2 over 8 GPUs, frozen bf16" in line
    assert f"use GPUs with at least {math.ceil(least)} GiB, or -c fsdp" in line


def test_advice_names_the_fewest_changes_that_fit_and_they_do():
    settings = P.PlanSettings(preset="paper", gpu_mem=18, micro_batch=2, checkpointing="none")
    result = P.plan(settings)
    assert not result["fits"]
    advice = fit_advice(settings, result)
    assert advice["changes"] and advice["micro_batch"] == 2
    assert P.plan(replace(settings, **advice["changes"]))["fits"]
    # no single change among those named is enough: fewer changes were tried first
    for name, value in advice["changes"].items():
        if len(advice["changes"]) > 1:
            assert not P.plan(replace(settings, **{name: value}))["fits"]
    assert plan_command.format_advice({**result, "advice": advice}).startswith(
        "  to fit micro-batch 2 in 18 GiB: "
    )
    assert fit_advice(settings, P.plan(replace(settings, gpu_mem=80))) is None


KIT = SHARED / "data" / "m3d_official"


@pytest.mark.skipif(not KIT.is_dir(), reason=f"parity kit not found at {KIT}")
def test_plan_of_an_official_directory_counts_its_weights_and_scales_its_widths(capsys):
    from m3d_lit.models.official.lamed import build_official_lamed
    from m3d_lit.models.presets import STAGE_TRAINABLE

    directory = KIT / "lamed_phi3"  # its LLM sets num_key_value_heads, which the reduction divides too
    settings = P.PlanSettings(model=str(directory), stage=3)
    counts = P.count_params(settings)
    model = build_official_lamed(directory)
    model.set_trainable(STAGE_TRAINABLE[3])
    assert sum(c["frozen"] + c["trainable"] for c in counts.values()) == sum(
        p.numel() for p in model.parameters()
    )
    assert sum(c["trainable"] for c in counts.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    # the reduced copy divides the key/value heads with the heads (Phi-3 sets them), or it cannot be built
    config = P.model_config(settings)
    assert P._measure_config(config, 2, P._lora(config, settings))["llm"]["num_key_value_heads"] == 2
    assert P.measure_activations(replace(settings, width_divisor=2))["llm_layer"] > 0
    with pytest.raises(ValueError, match=r"--overrides: would be ignored: an M3D-LaMed directory"):
        P.PlanSettings(model=str(directory), overrides={"llm": {"num_hidden_layers": 1}})
    assert plan_command.main(["--model", str(directory), "--gpu-mem", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"m3d-lit plan: model {directory}, stage 3, micro-batch 2")
