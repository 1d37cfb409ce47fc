"""Stage 2: align the perceiver (and the new token rows) with the vision encoder and the LLM frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from m3d_lit.data.collate import make_collator
from m3d_lit.errors import InputError
from m3d_lit.evaluation.visual import middle_slice_grid
from m3d_lit.inference.predictor import Predictor, Request
from m3d_lit.inference.records import prediction_record, sample_requests
from m3d_lit.models.build import build_lamed
from m3d_lit.models.lamed import cast_for_training
from m3d_lit.models.official.clip import load_m3d_clip
from m3d_lit.models.official.lamed import is_official_lamed
from m3d_lit.models.overrides import apply_overrides
from m3d_lit.tasks.base import BaseTask
from m3d_lit.tasks.metrics import TokenAccuracy

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

    def configure_models(self) -> nn.Module:
        self._official_init()
        model = build_lamed(self.hparams.preset, self.hparams.overrides, llm_path=self.hparams.llm_path)
        model.config = apply_overrides(model.config, self.run_settings())
        model.set_trainable(self.trainable_config())
        mode = self.hparams.gradient_checkpointing
        if mode != "none":
            model.enable_gradient_checkpointing(llm=mode in ("llm", "all"), vision=mode in ("vision", "all"))
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

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.clip_path and not self.trainer.ckpt_path:
            self.load_clip_vision(self.hparams.clip_path)
        self._check_data_size()
        if str(self.trainer.precision).startswith("bf16"):
            # bf16-mixed keeps fp32 weights by default: for a frozen 7B LLM that is 25 GiB, which does not
            # fit a 24 GB card. Frozen weights go to bf16, the trainable ones stay fp32 for the optimizer.
            cast_for_training(self.model, torch.bfloat16)

    def _check_data_size(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        sources = getattr(datamodule, "preprocessing", None) if datamodule is not None else None
        want = tuple(int(s) for s in self.model.img_size)
        for name, settings in (sources or {}).items():
            size = settings.get("size")
            if size is not None and tuple(int(s) for s in size) != want:
                root = (getattr(datamodule, "roots", None) or [f"source {name}"])[0]
                raise InputError(
                    root,
                    f"source {name!r} was prepared at size {list(size)}, but the model takes {list(want)} "
                    f"(every source of a run must be): prepare it again with `m3d-lit prepare ... --size "
                    f"{' '.join(map(str, want))}`",
                )

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

    def predictor(self) -> Predictor:
        """The model as it is now, answering through the one inference path (nothing merged or cast)."""
        return Predictor(self.model, self.bundle(), max_new_tokens=self.hparams.max_new_tokens)

    def on_predict_start(self) -> None:
        self._predictor = self.predictor()

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """The prediction records (as `m3d-lit eval` writes them) of a batch of samples: `m3d-lit predict
        -c stage3 --ckpt_path ...` (LightningCLI) over the DataModule's test split."""
        return [prediction_record(p) for p in self._predictor.answer(list(sample_requests(batch)))]

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
        masks = batch.get("masks")
        pred = [None if p.seg_logits is None else p.seg_logits.sigmoid() for p in answers]
        grid = middle_slice_grid(batch["images"][:n], None if masks is None else masks[:n], pred)
        writer.add_image("val/middle_slices", grid, self.global_step)
