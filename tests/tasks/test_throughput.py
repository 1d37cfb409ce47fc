"""`ThroughputLogger`'s FLOP count is `m3d-lit plan`'s (`flops_per_sample`) at each batch's width, with the
segmentation module only for the rows that run it; its figures in TensorBoard: test_streaming_train.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import CLIP, LAMED, built

from m3d_lit.models.plan import flops_per_sample
from m3d_lit.tasks import ClipTask, FinetuneTask
from m3d_lit.tasks.throughput import ThroughputLogger, _plan_settings, batch_flops, peak_flops


def _batch(model, width: int, seg: list[bool]) -> dict:
    ids = torch.full((len(seg), width), 7)
    ids[:, : model.num_visual_tokens] = model.im_patch_id
    ids[:, -2] = torch.tensor([model.seg_id if s else 7 for s in seg])
    return {"input_ids": ids, "seg_flags": torch.ones(len(seg), dtype=torch.bool)}


def test_stage3_flops_are_plans_at_the_batch_width_with_segmentation_per_row() -> None:
    task = built(FinetuneTask(preset="tiny", overrides=LAMED))
    settings = _plan_settings(task, 3)
    flops = batch_flops(task)
    for width in (40, 48):
        # plan's own count (parameters counted on a meta-device copy of the preset)
        plain, seg = (
            flops_per_sample(
                replace(settings, overrides={**settings.overrides, "max_length": width}, seg_share=s)
            )["train_model_flops"]
            for s in (0.0, 1.0)
        )
        assert seg > plain
        assert float(flops(_batch(task.model, width, [True, False, False]))) == 3 * plain + (seg - plain)
    assert float(flops(_batch(task.model, 40, [False]))) < float(flops(_batch(task.model, 48, [False])))


def test_stage1_flops_grow_with_rows_and_text_length() -> None:
    task = built(ClipTask(preset="tiny", overrides=CLIP))
    flops = batch_flops(task)
    one, two = (flops({"input_ids": torch.zeros(n, 16, dtype=torch.long)}) for n in (1, 2))
    assert two == 2 * one and flops({"input_ids": torch.zeros(1, 32, dtype=torch.long)}) > one > 0


def test_peak_figures() -> None:
    assert peak_flops(torch.device("cpu"), "32-true") is None  # no MFU on a CPU unless peak_tflops is given
    with pytest.raises(ValueError, match="peak_tflops must be positive"):
        ThroughputLogger(peak_tflops=0)
