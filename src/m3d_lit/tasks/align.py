"""Stage 2: align the perceiver (and the new token rows) with the vision encoder and the LLM frozen."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from m3d_lit.tasks.base import BaseTask

__all__ = ["AlignTask"]


class AlignTask(BaseTask):
    """Stage 2: image-text pairs, LM loss on the text; only the perceiver and the new token rows learn.

    Args:
        llm_path: local Hugging Face directory of the causal LM (None: random weights from the preset's
            config, for the tiny presets and benchmarks).
        log_examples: how many validation samples get their generated answer and middle slice logged to
            TensorBoard once per validation epoch.
        max_new_tokens: generation limit for those examples.
        **kwargs: see `BaseTask`.
    """

    stage = 2
    hparams_metrics = ("val/loss", "val/token_acc")
    default_init_prefixes = ("model.vision.",)

    def __init__(
        self,
        llm_path: str | None = None,
        log_examples: int = 4,
        max_new_tokens: int = 48,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)

    def configure_models(self) -> nn.Module:
        from m3d_lit.models.lamed import build_lamed

        model = build_lamed(self.hparams.preset, self.hparams.overrides, llm_path=self.hparams.llm_path)
        trainable = self.trainable_config()
        model.set_trainable(trainable, lora=self.hparams.get("lora"))
        mode = self.hparams.gradient_checkpointing
        if mode != "none":
            model.enable_gradient_checkpointing(llm=mode in ("llm", "all"), vision=mode in ("vision", "all"))
        return model

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if str(self.trainer.precision).startswith("bf16"):
            from m3d_lit.models.lamed import cast_for_training

            # bf16-mixed keeps fp32 weights by default: for a frozen 7B LLM that is 25 GiB, which does not
            # fit a 24 GB card. Frozen weights go to bf16, the trainable ones stay fp32 for the optimizer.
            cast_for_training(self.model, torch.bfloat16)

    def configure_metrics(self) -> nn.ModuleDict:
        from m3d_lit.tasks.metrics import TokenAccuracy

        return nn.ModuleDict({"token_acc": TokenAccuracy()})

    def configure_collate(self) -> Any:
        from m3d_lit.data.collate import LMCollator

        m = self.model
        return LMCollator(m.tokenizer, m.num_visual_tokens, m.max_length, tuple(m.img_size))

    def forward_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.model(
            batch["images"],
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            masks=batch.get("masks"),
            seg_flags=batch.get("seg_flags"),
        )

    def compute_loss(self, out: dict[str, Tensor], batch: dict[str, Any], split: str) -> Tensor:
        return out["lm_loss"]

    def model_step(self, batch: dict[str, Any], split: str) -> Tensor:
        out = self.forward_batch(batch)
        loss = self.compute_loss(out, batch, split)
        size = len(batch["input_ids"])
        sync = split != "train"
        self.log(f"{split}/loss", loss, batch_size=size, prog_bar=True, sync_dist=sync)
        self.log(f"{split}/lm_loss", out["lm_loss"], batch_size=size, sync_dist=sync)
        if split != "train":
            self.eval_metrics[split]["token_acc"].update(out["logits"].detach(), batch["labels"])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = super().validation_step(batch, batch_idx)
        if batch_idx == 0 and self.hparams.log_examples > 0 and self.global_rank == 0:
            self.log_examples(batch)
        return loss

    @torch.no_grad()
    def log_examples(self, batch: dict[str, Any]) -> None:
        """Generate answers for the first samples of a batch; log them as a text table and images."""
        from m3d_lit.data.collate import LMCollator
        from m3d_lit.evaluation.visual import middle_slice_grid

        writer = self.tensorboard()
        if writer is None:
            return
        n = min(self.hparams.log_examples, len(batch["questions"]))
        m = self.model
        collate = LMCollator(
            m.tokenizer, m.num_visual_tokens, m.max_length, tuple(m.img_size), generation=True
        )
        items = [
            {
                "id": batch["ids"][i],
                "image": batch["images"][i].float().cpu(),
                "question": batch["questions"][i],
                "answer": batch["answers"][i],
                "kind": batch["kinds"][i],
                "mask": None,
                "dataset": batch["datasets"][i],
            }
            for i in range(n)
        ]
        prompt = collate(items)
        out = m.generate(
            batch["images"][:n],
            prompt["input_ids"].to(self.device),
            prompt["attention_mask"].to(self.device),
            max_new_tokens=self.hparams.max_new_tokens,
        )
        rows = ["| question | reference | generated |", "| --- | --- | --- |"]
        rows += [
            f"| {q} | {a} | {g} |" for q, a, g in zip(batch["questions"], batch["answers"], out["texts"])
        ]
        writer.add_text("val/examples", "\n".join(rows), self.global_step)
        masks = batch.get("masks")
        pred = [None if s is None else s.sigmoid() for s in out["seg_logits"]]
        grid = middle_slice_grid(batch["images"][:n], None if masks is None else masks[:n], pred)
        writer.add_image("val/middle_slices", grid, self.global_step)
