"""Stage 2: align the perceiver (and the new token rows) with the vision encoder and the LLM frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from m3d_lit.data.collate import make_collator, row_masks
from m3d_lit.errors import InputError
from m3d_lit.evaluation.visual import middle_slice_grid
from m3d_lit.inference.predictor import Predictor, Request
from m3d_lit.inference.records import prediction_record, sample_requests
from m3d_lit.models.blocks import checkpoint_parts
from m3d_lit.models.build import build_lamed
from m3d_lit.models.official.clip import load_m3d_clip
from m3d_lit.models.official.lamed import is_official_lamed
from m3d_lit.models.overrides import apply_overrides
from m3d_lit.tasks.base import BaseTask
from m3d_lit.tasks.metrics import TokenAccuracy
from m3d_lit.tasks.strategies import whole_weights

__all__ = ["AlignTask"]


class AlignTask(BaseTask):
    """Stage 2: image-text pairs, LM loss on the text; only the perceiver and the new token rows learn.

    Args:
        llm_path: local Hugging Face directory of the causal LM (None: random weights from the preset's
            config, for the tiny presets and benchmarks), or an official M3D-LaMed directory (the whole
            model is built from it; `init_from` such a directory sets this).
        clip_path: an official M3D-CLIP directory whose vision encoder starts this stage's, in place of
            `init_from`'s (read on a fresh run only; the preset's vision sizes must be M3D-CLIP's).
        random_llm: with the `paper` preset and no `llm_path`, build the random 7B LLM anyway (memory and
            speed tests); without it that combination is refused, as it would train against noise.
        log_examples: how many validation samples get their generated answer and middle slice logged to
            TensorBoard once per validation epoch.
        max_new_tokens: generation limit for those examples.
        compile_blocks: `torch.compile` the ViT blocks, the LLM's decoder layers and the segmentation
            encoder's blocks for training (`fit` only; the first steps are slow while they compile).
        **kwargs: see `BaseTask`.
    """

    stage = 2
    hparams_metrics = ("val/loss", "val/token_acc")
    default_init_prefixes = ("model.vision.",)

    def __init__(
        self,
        llm_path: str | None = None,
        clip_path: str | None = None,
        random_llm: bool = False,
        log_examples: int = 4,
        max_new_tokens: int = 48,
        compile_blocks: bool = False,
        **kwargs: Any,
    ) -> None:
        official = kwargs.get("init_from") and is_official_lamed(kwargs["init_from"])
        if kwargs.get("preset", "tiny") == "paper" and llm_path is None and not random_llm and not official:
            raise InputError(
                "llm_path",
                "the paper preset needs the pretrained LLM: pass --model.llm_path /models/Llama-2-7b-hf "
                "(null would build a random 6.7B-parameter LLM; --model.random_llm true does so on purpose)",
            )
        super().__init__(**kwargs)
        self._compiled = False
        if clip_path is not None:
            self._check_clip_path(clip_path)

    def _check_clip_path(self, clip_path: str) -> None:
        # The directory itself is read in `setup`: a checkpoint rebuilt for eval must not need it.
        prefixes = self.hparams.init_prefixes or self.default_init_prefixes
        vision = "model.vision."
        if self.hparams.init_from and any(vision.startswith(p) or p.startswith(vision) for p in prefixes):
            raise InputError(
                clip_path,
                f"clip_path and init_from ({self.hparams.init_from}) would both start the vision encoder; "
                "set --model.init_from null (or init_prefixes without model.vision.)",
            )

    def load_clip_vision(self, path: str) -> None:
        """Copy the vision encoder of an M3D-CLIP directory into `model.vision`; every shape must match."""
        source, own = load_m3d_clip(path).vision.state_dict(), self.model.vision.state_dict()
        for name in sorted(set(source) | set(own)):
            theirs = tuple(source[name].shape) if name in source else "absent"
            ours = tuple(own[name].shape) if name in own else "absent"
            if theirs != ours:
                raise InputError(
                    path,
                    f"its vision encoder does not fit this model's: vision.{name} is {theirs} there and "
                    f"{ours} here (set img_size, patch_size and vision in the overrides to M3D-CLIP's)",
                )
        self.model.vision.load_state_dict(source)
        rank_zero_info(f"clip_path {path}: vision encoder loaded ({len(source)} tensors)")

    def build_model(self) -> nn.Module:
        self._official_init()
        model = build_lamed(
            self.hparams.preset, self.hparams.overrides, llm_path=self.hparams.llm_path, dtype=self.llm_dtype()
        )
        model.config = apply_overrides(model.config, self.run_settings())
        model.set_trainable(self.trainable_config())
        parts = checkpoint_parts(self.hparams.gradient_checkpointing)
        if parts:
            model.enable_gradient_checkpointing(
                llm="llm" in parts, vision="vision" in parts, seg="seg" in parts
            )
        return model

    def _official_init(self) -> None:
        """`init_from` an official M3D-LaMed directory builds the model from it: it becomes `llm_path`, so
        the model (every weight of the directory) and later checkpoints are rebuilt from it."""
        source = self.hparams.init_from
        if not source or not is_official_lamed(source):
            return
        if self.hparams.llm_path and Path(self.hparams.llm_path) != Path(source):
            raise InputError(
                source,
                f"is an M3D-LaMed directory, which brings its own LLM: drop --model.llm_path "
                f"{self.hparams.llm_path}",
            )
        self.hparams.llm_path = str(source)

    def load_init_weights(self, path: str | Path) -> None:
        if self.hparams.llm_path and Path(path) == Path(self.hparams.llm_path):
            rank_zero_info(f"init_from {path}: the model was built from this M3D-LaMed directory")
            return
        super().load_init_weights(path)

    def on_model_ready(self, fresh_fit: bool) -> None:
        if fresh_fit and self.hparams.clip_path:
            self.load_clip_vision(self.hparams.clip_path)

    def configure_model(self) -> None:
        super().configure_model()
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if fitting and self.hparams.compile_blocks and not self._compiled:
            # last: on the weights as they train (cast, sharded), once per model
            self.model.compile_blocks()
            self._compiled = True

    def configure_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({"token_acc": TokenAccuracy()})

    def configure_collate(self) -> Any:
        return make_collator(self.model)

    def forward_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.model(
            batch["images"],
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            masks=batch.get("masks"),
            seg_flags=batch.get("seg_flags"),
            seg_rows=batch.get("seg_rows"),
            label_positions=batch.get("label_positions"),
        )

    def compute_loss(self, out: dict[str, Tensor], batch: dict[str, Any], split: str) -> Tensor:
        return out["lm_loss"]

    def item_counts(self, out: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        """How many items each mean in `out` is over: the answer tokens of the LM loss."""
        return (batch["labels"][:, 1:] != -100).sum().reshape(1)

    def global_terms(self, out: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        """`out` with its training loss terms as shares of the global batch's means (`global_shares`)."""
        shares = self.global_shares(self.item_counts(out, batch))
        if shares is None:
            return out
        return {**out, **{k: out[k] * shares[i].to(out[k].dtype) for i, k in enumerate(self.loss_terms)}}

    loss_terms: tuple[str, ...] = ("lm_loss",)

    def model_step(self, batch: dict[str, Any], split: str) -> Tensor:
        out = self.forward_batch(batch)
        if split == "train":
            out = self.global_terms(out, batch)
        loss = self.compute_loss(out, batch, split)
        size = len(batch["input_ids"])
        self.log_loss(split, loss, size)
        self.log_term(split, "lm_loss", out["lm_loss"], size)
        if split != "train":
            self.eval_metrics[split]["token_acc"].update(out["predicted"], out["targets"])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = super().validation_step(batch, batch_idx)
        # sharded weights are whole only inside a forward that every rank runs: no rank-0 generation then
        sharded = isinstance(self.trainer.strategy, ModelParallelStrategy)
        if batch_idx == 0 and self.hparams.log_examples > 0 and self.global_rank == 0 and not sharded:
            self.log_examples(batch)
        return loss

    def predictor(self) -> Predictor:
        """The model as it is now, answering through the one inference path (nothing merged or cast)."""
        return Predictor(self.model, self.bundle(), max_new_tokens=self.hparams.max_new_tokens)

    def on_predict_start(self) -> None:
        self._predictor = self.predictor()

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """The prediction records (as `m3d-lit eval` writes them) of a batch of samples: `m3d-lit predict
        -c stage3 --ckpt_path ...` (LightningCLI) over the DataModule's test split."""
        requests = list(sample_requests(batch))
        with whole_weights(self.model):
            return [prediction_record(p) for p in self._predictor.answer(requests)]

    @torch.no_grad()
    def log_examples(self, batch: dict[str, Any]) -> None:
        """Answer the first questions of a batch; log them as a text table and the middle slices."""
        writer = self.tensorboard()
        if writer is None:
            return
        n = min(self.hparams.log_examples, len(batch["questions"]))
        requests = [
            Request(
                batch["questions"][i], batch["images"][i].float().cpu(), str(batch["ids"][i]), closed=False
            )
            for i in range(n)
        ]
        answers = self.predictor().answer(requests)
        rows = ["| question | reference | generated |", "| --- | --- | --- |"]
        rows += [
            f"| {q} | {a} | {p.text} |" for q, a, p in zip(batch["questions"], batch["answers"], answers)
        ]
        writer.add_text("val/examples", "\n".join(rows), self.global_step)
        pred = [None if p.seg_logits is None else p.seg_logits.sigmoid() for p in answers]
        grid = middle_slice_grid(batch["images"][:n], row_masks(batch, n), pred)
        writer.add_image("val/middle_slices", grid, self.global_step)
