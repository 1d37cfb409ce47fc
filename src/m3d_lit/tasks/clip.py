"""Stage 1: contrastive (CLIP-style) pretraining of the 3D ViT against the text encoder."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from m3d_lit.data.collate import make_collator
from m3d_lit.errors import InputError
from m3d_lit.losses.contrastive import clip_loss
from m3d_lit.models.clip import build_clip
from m3d_lit.tasks.base import BaseTask
from m3d_lit.tasks.metrics import RetrievalRecall

__all__ = ["ClipTask"]


class ClipTask(BaseTask):
    """Stage 1: image CLS feature vs text CLS feature, symmetric cross-entropy over the global batch.

    Under DDP the features of every rank are gathered with their gradients, so each rank computes the loss
    of the whole global batch (the same value one process would get on it).

    Args:
        text_path: local directory of a BERT-family encoder (None: built from the preset's config).
        text_max_length: token limit of the report text.
        random_text: with the `paper` preset and no `text_path`, build the random BERT anyway (memory and
            speed tests); without it that combination is refused.
        **kwargs: see `BaseTask`.
    """

    stage = 1
    hparams_metrics = ("val/loss", "val/i2t_R@1", "val/t2i_R@1")

    def __init__(
        self,
        text_path: str | None = None,
        text_max_length: int = 128,
        random_text: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("preset", "tiny") == "paper" and text_path is None and not random_text:
            raise InputError(
                "text_path",
                "the paper preset needs a pretrained text encoder: pass --model.text_path "
                "/models/bert-base-uncased (null would train against a random BERT that knows no word; "
                "--model.random_text true does so on purpose)",
            )
        super().__init__(**kwargs)

    def build_model(self) -> nn.Module:
        model = build_clip(self.hparams.preset, self.hparams.overrides, text_path=self.hparams.text_path)
        model.set_trainable(self.trainable_config())
        return model

    def configure_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({"recall": RetrievalRecall(ks=(1, 5, 10))})

    def configure_collate(self) -> Any:
        return make_collator(self.model, max_length=self.hparams.text_max_length)

    def _gather(self, features: Tensor) -> Tensor:
        if self.trainer.world_size <= 1:
            return features
        return self.all_gather(features, sync_grads=True).flatten(0, 1)

    def model_step(self, batch: dict[str, Any], split: str) -> Tensor:
        image, text, scale = self.model(batch["images"], batch["input_ids"], batch["attention_mask"])
        if split == "train":
            image, text = self._gather(image), self._gather(text)
        loss = clip_loss(image, text, scale)
        size = len(batch["input_ids"])
        self.log_loss(split, loss, size)
        if split == "train":
            self.log("train/logit_scale", scale, batch_size=size)
        else:
            self.eval_metrics[split]["recall"].update(image, text)
        return loss
