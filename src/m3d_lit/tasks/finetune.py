"""Stage 3: instruction fine-tune: ViT, perceiver, LoRA on the LLM, new token rows, segmentation module."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from m3d_lit.models.segmentation import load_segvol_weights
from m3d_lit.tasks.align import AlignTask
from m3d_lit.tasks.metrics import MeanDice

__all__ = ["FinetuneTask"]


class FinetuneTask(AlignTask):
    """Stage 3: loss = LM + w_dice * Dice + w_bce * BCE (the mask terms only on rows that produce `[SEG]`).

    The LoRA settings and the loss weights live in the model configuration (`ModelConfig.lora`,
    `ModelConfig.loss`, `models/config.py`), which also holds their defaults; these arguments set them
    for a run (applied over the preset and `overrides`). Unset, the configuration's values stand.

    Args:
        lora: the LLM's LoRA settings (`r`, `alpha`, `dropout`, `target_modules`; paper: 16, 32, 0.1).
        w_dice: weight of the Dice loss (`loss.w_dice`).
        w_bce: weight of the binary cross-entropy of the mask (`loss.w_bce`).
        segvol_path: SegVol's released checkpoint (or the `model.*` dict M3D's `pretrain_seg_module`
            reads) to start the segmentation module from, on a fresh run like `init_from`; set
            `overrides.segmentation.full_decoder: true` so the decoder computes what SegVol computes.
        **kwargs: see `AlignTask` and `BaseTask`.
    """

    stage = 3
    hparams_metrics = ("val/loss", "val/token_acc", "val/dice")
    default_init_prefixes = ("model.vision.", "model.perceiver.", "model.new_tokens.")

    def __init__(
        self,
        lora: dict[str, Any] | None = None,
        w_dice: float | None = None,
        w_bce: float | None = None,
        segvol_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)

    def run_settings(self) -> dict[str, Any]:
        weights = {"w_dice": self.hparams.w_dice, "w_bce": self.hparams.w_bce}
        settings: dict[str, Any] = {"loss": {k: v for k, v in weights.items() if v is not None}}
        if self.hparams.lora is not None:
            settings["lora"] = self.hparams.lora
        return settings

    def on_model_ready(self, fresh_fit: bool) -> None:
        super().on_model_ready(fresh_fit)
        if fresh_fit and self.hparams.segvol_path:
            loaded = load_segvol_weights(self.model.segmentation, self.hparams.segvol_path)
            rank_zero_info(f"segvol_path {self.hparams.segvol_path}: loaded {len(loaded['loaded'])} tensors")

    def configure_metrics(self) -> nn.ModuleDict:
        metrics = super().configure_metrics()
        metrics["dice"] = MeanDice()
        # The mask loss terms, weighted by their rows: a rank whose share holds no [SEG] row still takes
        # part in the epoch-end sync, where a `self.log(..., sync_dist=True)` it never called would hang.
        for name in ("loss_dice", "loss_bce"):
            metrics[name] = MeanMetric().set_dtype(torch.float64)
        return metrics

    loss_terms = ("lm_loss", "dice", "bce")

    def item_counts(self, out: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        """Answer tokens for the LM loss; the rows that made a mask for Dice and BCE."""
        tokens = super().item_counts(out, batch)
        rows = tokens.new_full((1,), len(out["seg_rows"]))
        return torch.cat([tokens, rows, rows])

    def compute_loss(self, out: dict[str, Tensor], batch: dict[str, Any], split: str) -> Tensor:
        weights = self.model.config.loss
        loss = out["lm_loss"] + weights.w_dice * out["dice"] + weights.w_bce * out["bce"]
        # the rows that segment: a shape known on the host, so nothing here waits for the device
        size = len(out["seg_rows"])
        if split == "train" and (size or self.trainer.world_size > 1):
            # under data parallelism every rank logs its share (0 without mask rows): the terms' global
            # mean comes from all of them, and a collective some ranks skip would stall the others
            self.log_term(split, "loss_dice", out["dice"], max(size, 1))
            self.log_term(split, "loss_bce", out["bce"], max(size, 1))
        if split == "train" or size == 0:
            return loss
        metrics = self.eval_metrics[split]
        metrics["loss_dice"].update(out["dice"].detach(), weight=size)
        metrics["loss_bce"].update(out["bce"].detach(), weight=size)
        # seg_logits row j belongs to batch row seg_rows[j], and so does the batch's mask j
        metrics["dice"].update(out["seg_logits"].detach(), batch["masks"])
        return loss
