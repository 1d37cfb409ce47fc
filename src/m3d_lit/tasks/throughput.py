"""Throughput of the real training loop: samples/s, non-padding tokens/s and MFU, logged to TensorBoard.

`ThroughputLogger` (listed in every stage recipe) logs, at each log interval of the run (the trainer's
`log_every_n_steps`), the rates over the batches since the previous one:
`throughput/samples_per_sec` and `throughput/tokens_per_sec` (all ranks; tokens are the non-padding
tokens the model reads: the text of stage 1, the image placeholders and text of stages 2-3),
`throughput/tflops_per_sec` (model FLOPs per second per device) and `throughput/mfu` (that over the
device's peak). The first batch of a run (start-up: workers, allocator, kernels) is left out, so the
figures start at the first log interval after it; validation time is left out too.

FLOPs per sample are the ones `m3d-lit plan` counts (`models.plan.flops_per_sample`: model FLOPs, without
recomputation), at the batch's padded width (the positions the model computes) and with the
segmentation module only for rows that run it. Stage 1 is not a plan stage: its vision encoder is
counted by the same function and its text encoder by the same rule (2 x parameters x tokens + attention).

The counters stay on the device between log points: one device sync and one all-reduce per interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from m3d_lit.models.llm import unwrap
from m3d_lit.models.plan import PlanSettings, flops_per_sample

__all__ = ["ThroughputLogger", "batch_flops", "peak_flops"]

# GeForce RTX 4090: dense FP16/BF16 tensor rate with FP32 accumulate (what autocast's matmuls use), from
# NVIDIA's Ada whitepaper; Lightning's table lists the card's non-tensor FP32 rate (82.6) for these dtypes.
_PEAKS = {("4090", torch.bfloat16): 165.2e12, ("4090", torch.float16): 165.2e12}
_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}
_LLM_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size")  # fmt: skip


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak dense FLOP/s at the trainer's precision (None where no figure is known: CPUs)."""
    dtype = _DTYPES.get(str(precision).split("-")[0], torch.float32)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (card, kind), value in _PEAKS.items():
            if card in name and kind == dtype:
                return value
    found = get_available_flops(device, dtype)
    return float(found) if found else None


def _plan_settings(pl_module: LightningModule, stage: int) -> PlanSettings:
    model = pl_module.model
    # the model's whole configuration over the task's preset (an M3D-LaMed directory names its own "preset")
    overrides = {k: v for k, v in model.config.to_dict().items() if k != "preset"}
    llm = getattr(model, "llm", None)
    if llm is not None:  # an llm_path or M3D-LaMed directory brings its own sizes, not the preset's
        hf = unwrap(llm).config
        sizes = {k: getattr(hf, k) for k in _LLM_SIZES if getattr(hf, k, None) is not None}
        # the sizes and family are what the count reads; a directory's other keys need not be settings
        family = {k: v for k, v in overrides["llm"].items() if k == "family"}
        overrides["llm"] = {**family, **sizes}
    checkpointing = pl_module.hparams.get("gradient_checkpointing", "none")
    trainable = pl_module.trainable_config() if stage in (2, 3) else None
    return PlanSettings(
        preset=str(pl_module.hparams.preset),
        stage=stage if stage in (2, 3) else 2,
        overrides=overrides,
        trainable=trainable,
        checkpointing=checkpointing,
    )


def _counts(parts: dict[str, list[nn.Module]]) -> dict[str, dict[str, int]]:
    """`count_params`'s figures (frozen, trainable, trainable_matrix per part), read off the built model: one
    from `llm_path` or an M3D-LaMed directory is not its preset."""
    counts = {}
    for name, modules in parts.items():
        entry = {"frozen": 0, "trainable": 0, "trainable_matrix": 0}
        for param in (p for m in modules for p in m.parameters()):
            entry["trainable" if param.requires_grad else "frozen"] += param.numel()
            entry["trainable_matrix"] += param.numel() if param.requires_grad and param.dim() >= 2 else 0
        counts[name] = entry
    return counts


def _lamed_flops(pl_module: LightningModule) -> Callable[[dict[str, Any]], Any]:
    settings = _plan_settings(pl_module, pl_module.stage)
    model = pl_module.model
    counts = _counts({"vision": [model.vision], "perceiver": [model.perceiver], "llm": [model.llm],
                      "new_token_rows": [model.new_tokens], "segmentation": [model.segmentation, model.seg_head]})  # fmt: skip
    seg_id = pl_module.model.seg_id

    @cache
    def per_sample(width: int, share: float) -> float:
        at = replace(settings, overrides={**settings.overrides, "max_length": width}, seg_share=share)
        return flops_per_sample(at, counts)["train_model_flops"]

    def flops(batch: dict[str, Any]) -> Any:
        rows, width = batch["input_ids"].shape
        plain = rows * per_sample(width, 0.0)
        if pl_module.stage != 3 or batch.get("seg_flags") is None:
            return plain
        seg = ((batch["input_ids"] == seg_id).any(1) & batch["seg_flags"].bool()).sum().double()
        return seg * (per_sample(width, 1.0) - per_sample(width, 0.0)) + plain

    return flops


def _clip_flops(pl_module: LightningModule) -> Callable[[dict[str, Any]], Any]:
    settings = _plan_settings(pl_module, 1)
    model = pl_module.model
    parts = {"vision": [model.vision], "perceiver": [], "llm": [], "new_token_rows": [], "segmentation": []}
    vision = flops_per_sample(settings, _counts(parts))["forward"]["vision"]
    text = model.text.config
    embeddings = sum(p.numel() for n, p in model.text.named_parameters() if "embeddings" in n)
    matrices = sum(p.numel() for p in model.text.parameters()) - embeddings
    projections = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("vision.", "text."))
    )
    factor = {part: 3.0 if any(p.requires_grad for p in getattr(model, part).parameters()) else 1.0
              for part in ("vision", "text")}  # fmt: skip

    def flops(batch: dict[str, Any]) -> float:
        rows, width = batch["input_ids"].shape
        text_forward = (
            2.0 * matrices * width + 4.0 * width * width * text.hidden_size * text.num_hidden_layers
        )
        per = factor["vision"] * vision + factor["text"] * text_forward + 3.0 * 2.0 * projections
        return rows * per

    return flops


def batch_flops(pl_module: LightningModule) -> Callable[[dict[str, Any]], Any]:
    """A function of a training batch giving the model FLOPs of its step (a number or a device tensor)."""
    return _clip_flops(pl_module) if pl_module.stage == 1 else _lamed_flops(pl_module)


class ThroughputLogger(Callback):
    """Log samples/s, non-padding tokens/s, model TFLOP/s and MFU of training at every log interval.

    Args:
        peak_tflops: the device's peak dense TFLOP/s at the run's precision, for MFU (None: the RTX 4090's
            165.2 with bf16/fp16, else Lightning's table of GPUs; a CPU has none, so no MFU is logged).
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"peak_tflops must be positive, got {peak_tflops}")
        self.peak_tflops = peak_tflops
        self.peak: float | None = None
        self.flops: Callable[[dict[str, Any]], Any] | None = None
        self._origin: float | None = None
        self._val_start: float | None = None
        self._paused = 0.0
        self._counts: list[Any] = [0, 0, 0.0]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # here, not in `setup`: the task builds its model in `configure_model`, after `setup`
        self._origin, self._paused, self._counts = None, 0.0, [0, 0, 0.0]
        try:
            self.flops = batch_flops(pl_module)
        except Exception as err:  # a FLOP count the plan cannot make must not stop training
            self.flops = None
            rank_zero_warn(
                f"ThroughputLogger: no FLOP count for this model ({err}); TFLOP/s and MFU not logged"
            )
        device = trainer.strategy.root_device
        self.peak = self.peak_tflops * 1e12 if self.peak_tflops else peak_flops(device, trainer.precision)
        if self.peak is None and device.type != "cpu":  # a CPU's MFU means nothing: no advice to give
            rank_zero_info(f"ThroughputLogger: no peak FLOP/s known for {device}; set peak_tflops to log MFU")

    def _now(self, pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the queued kernels belong to the interval
        return time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._origin is None:  # the first batch: the interval starts when it is done
            self._origin = self._now(pl_module)
            return
        samples, tokens, flops = self._counts
        mask = batch["attention_mask"]
        counted = self.flops(batch) if self.flops is not None else 0.0
        self._counts = [samples + len(mask), tokens + mask.sum(), flops + counted]
        if trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
            return  # Lightning's own test of "this step is logged", as its LearningRateMonitor uses
        now = self._now(pl_module)
        elapsed, self._origin, self._paused = now - self._origin - self._paused, now, 0.0
        totals = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=pl_module.device)
                              for c in self._counts])  # fmt: skip
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        self._counts = [0, 0, 0.0]
        metrics = {
            "throughput/samples_per_sec": totals[0] / elapsed,
            "throughput/tokens_per_sec": totals[1] / elapsed,
        }
        if self.flops is not None:
            metrics["throughput/tflops_per_sec"] = totals[2] / elapsed / trainer.world_size / 1e12
        if self.peak and self.flops is not None:
            metrics["throughput/mfu"] = metrics["throughput/tflops_per_sec"] * 1e12 / self.peak
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._val_start is not None and self._origin is not None:
            self._paused += time.perf_counter() - self._val_start
        self._val_start = None
