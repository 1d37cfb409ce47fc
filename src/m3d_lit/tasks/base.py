"""`BaseTask`: what every training stage shares.

A stage is a recipe (`stages/*.yaml`); a task is the LightningModule that runs it. Subclasses build their
model in `configure_models`, build their collator in `configure_collate` (`setup` hands it to the
DataModule with `set_collator`), and compute their
losses in `model_step`. Moving weights between stages (`init_from`) and resuming a stage (`--ckpt_path`)
are kept apart: `init_from` is only read when a run starts fresh.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm, rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection

from m3d_lit.errors import InputError
from m3d_lit.inference.bundle import Bundle, describe_model
from m3d_lit.inference.checkpoints import read_checkpoint, resolve_checkpoint
from m3d_lit.models.perceiver import set_batchnorm_sync
from m3d_lit.models.presets import STAGE_TRAINABLE
from m3d_lit.tasks.checkpoints import (
    base_fingerprint,
    check_init_source,
    frozen_base_keys,
    restore_frozen_base,
    rng_states,
    set_rng_states,
    summarise_init,
)
from m3d_lit.tasks.hparams import write_hparams

__all__ = ["EVAL_SPLITS", "BaseTask", "warmup_cosine"]

EVAL_SPLITS = ("val", "test")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BaseTask(LightningModule):
    """Shared behaviour of the three stages.

    Args:
        preset: model size preset (`tiny`, `small`, `paper`).
        overrides: values deep-merged into the preset (e.g. `{llm: {num_hidden_layers: 2}}`).
        trainable: per component `frozen | full | lora`; missing keys take the stage's defaults.
        init_from: the previous stage's checkpoint whose weights start this one (only on a fresh run): a
            `.ckpt` file, a run folder (`runs/stage2/version_0`: its newest checkpoint) or a stage folder
            (`runs/stage2`: its latest run); the log says which checkpoint it took.
        init_prefixes: state-dict prefixes taken from `init_from`; every matching key must be present (unset:
            the stage's defaults, plus every other weight of the checkpoint that fits this model).
        optimizer: optimizer factory (LightningCLI injects it from YAML: class_path + init_args).
        warmup_ratio: share of the total steps spent in linear warm-up.
        min_lr_ratio: final learning rate of the cosine decay, as a share of the peak.
        lr_scale: per-component multiplier of the learning rate, e.g. `{perceiver: 10.0}`.
        gradient_checkpointing: non-reentrant activation checkpointing (`none`, `llm`, `vision`, `all`);
            a stage without an LLM ignores `llm`.
    """

    stage: int = 0
    default_init_prefixes: tuple[str, ...] = ()
    hparams_metrics: tuple[str, ...] = ("val/loss",)

    def __init__(
        self,
        preset: str = "tiny",
        overrides: dict[str, Any] | None = None,
        trainable: dict[str, str] | None = None,
        init_from: str | None = None,
        init_prefixes: list[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        lr_scale: dict[str, float] | None = None,
        gradient_checkpointing: str = "none",
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise InputError("warmup_ratio", f"{warmup_ratio} must be in [0, 1)")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise InputError("min_lr_ratio", f"{min_lr_ratio} must be in [0, 1]")
        if gradient_checkpointing not in ("none", "llm", "vision", "all"):
            raise InputError(
                "gradient_checkpointing", f"{gradient_checkpointing!r} is not none | llm | vision | all"
            )
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.model: nn.Module = self.configure_models()
        self._init_loaded = False
        self.param_groups()  # an lr_scale naming no trainable part is refused now, not at the first step

        self._data_record: tuple[dict[str, Any], str | None] = ({}, None)
        # one MetricCollection per split: `val/token_acc`, `test/dice`, ...; members are reached by their
        # own names (`self.eval_metrics["val"]["dice"]`)
        self.eval_metrics = nn.ModuleDict(
            {
                split: MetricCollection(
                    dict(self.configure_metrics()), prefix=f"{split}/", compute_groups=False
                )
                for split in EVAL_SPLITS
            }
        )
        self._init_reliability()

    # -- what each stage provides -------------------------------------------------------------------
    def configure_models(self) -> nn.Module:
        raise NotImplementedError

    def configure_collate(self) -> Any:
        raise NotImplementedError

    def run_settings(self) -> dict[str, Any]:
        """Model-config sections this stage's own arguments set for the run (`FinetuneTask`: `lora` and
        `loss`); applied over the preset and `overrides`, after the model is built."""
        return {}

    def model_step(self, batch: dict[str, Any], split: str) -> Tensor:
        raise NotImplementedError

    def configure_metrics(self) -> nn.ModuleDict:
        """torchmetrics of one evaluation split (`val`, `test`), by name; each split gets its own copy in a
        `MetricCollection` (`self.eval_metrics[split]`): `model_step` updates them, the epoch's end logs them
        (`log_epoch_metrics`). A metric's `compute` gives a value or a dict of named values."""
        return nn.ModuleDict()

    # -- shared machinery ---------------------------------------------------------------------------
    def trainable_config(self) -> dict[str, str]:
        return {**STAGE_TRAINABLE[self.stage], **(self.hparams.trainable or {})}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            if not hasattr(datamodule, "set_collator"):
                raise TypeError(
                    f"{type(datamodule).__name__} has no set_collator(collate): derive the DataModule from "
                    "m3d_lit.data.datamodules.BaseDataModule, which batches with the task's collator"
                )
            # predicting hands the samples themselves to `predict_step`: the Predictor batches them
            datamodule.set_collator(list if stage == "predict" else self.configure_collate())
            # read once per run (the data do not change under it), recorded in every checkpoint's bundle
            self._data_record = (dict(datamodule.preprocessing or {}), datamodule.fingerprint())
        # `sync_batchnorm=True` converts torch's batch norms; the perceiver's synchronises itself
        sync = getattr(self.trainer.strategy, "_layer_sync", None) is not None
        if set_batchnorm_sync(self, sync) and sync:
            rank_zero_info("sync_batchnorm: the perceiver's batch norm takes its statistics over all ranks")
        if stage == "fit" and self.hparams.init_from:
            if self.trainer.ckpt_path:
                rank_zero_info(f"resuming from {self.trainer.ckpt_path}: init_from is not read")
            elif not self._init_loaded:  # `m3d-lit fit` loads it before the run writes anything
                self.load_init_weights(self.hparams.init_from)

    def on_fit_start(self) -> None:
        # The recipes turn off Lightning's placeholder `hp_metric`; pair the hparams with real tags instead.
        writer = self.tensorboard()
        if writer is not None and self.trainer.is_global_zero:
            write_hparams(writer, self.hparams, self.hparams_metrics)

    def load_init_weights(self, path: str | Path) -> None:
        """Start from another stage's checkpoint: the `init_prefixes` weights must all be there.

        With `init_prefixes` unset, the stage's default prefixes are required and every other weight of
        the checkpoint that this model has, with the same shape, is taken too: a segmentation module or
        LoRA adapters trained or loaded earlier carry on. The log names, per part, what came from the
        checkpoint and what starts as built here (`init_summary` keeps the counts).
        """
        prefixes = tuple(self.hparams.init_prefixes or self.default_init_prefixes)
        resolved = resolve_checkpoint(path)
        if resolved.how:
            rank_zero_info(f"init_from {resolved.how}")
        path = resolved.path
        checkpoint = read_checkpoint(path)
        source = checkpoint.get("state_dict")
        if not isinstance(source, dict):
            raise InputError(path, "has no state_dict: not a Lightning checkpoint of m3d-lit")
        check_init_source(path, checkpoint, self)
        own = self.state_dict()
        wanted = [key for key in own if key.startswith(prefixes)]
        missing = [key for key in wanted if key not in source]
        if not wanted or missing:
            raise InputError(
                path,
                f"lacks {len(missing) if wanted else 'all'} weights under {list(prefixes)} "
                f"(first: {missing[:3]}); was it written by the previous stage with the same preset?",
            )
        bad = [k for k in wanted if source[k].shape != own[k].shape]
        if bad:
            raise InputError(
                path,
                f"shape mismatch for {bad[:3]} (checkpoint {tuple(source[bad[0]].shape)} vs model "
                f"{tuple(own[bad[0]].shape)}): made with another preset?",
            )
        if not self.hparams.init_prefixes:
            required = set(wanted)
            wanted += [
                k for k in own if k not in required and k in source and source[k].shape == own[k].shape
            ]
        self.load_state_dict({k: source[k] for k in wanted}, strict=False)
        self._init_loaded = True
        self.init_summary, text = summarise_init(own, source, wanted, self.hparams.get("llm_path"))
        rank_zero_info(f"init_from {path}: {text}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.model_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.model_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        raise InputError(
            "predict",
            f"{type(self).__name__} (stage {self.stage}) answers no questions: predict with stage 2 or 3",
        )

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    def log_epoch_metrics(self, split: str) -> None:
        """Log the split's metric collection over the whole epoch and reset it.

        Every rank calls `compute`, which synchronises each metric's state across ranks, so every rank holds
        the same epoch value. A value that is not finite (nothing seen, e.g. no `[SEG]` row) is not logged.
        """
        collection = self.eval_metrics[split]
        results = collection.compute()
        collection.reset()
        for key, value in results.items():
            value = torch.as_tensor(value, dtype=torch.float64, device=self.device)
            if bool(torch.isfinite(value)):
                # already equal on every rank: "max" keeps it exact where a mean would round
                self.log(key, value, sync_dist=True, reduce_fx="max")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.model, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"], on_step=True, on_epoch=False)

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer group per top-level part with trainable weights, each with its `lr_scale`."""
        scale = self.hparams.lr_scale or {}
        groups = []
        for name, module in self.model.named_children():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "name": name, "lr_scale": scale.get(name, 1.0)})
        direct = [p for n, p in self.model.named_parameters(recurse=False) if p.requires_grad]
        if direct:
            groups.append({"params": direct, "name": "model", "lr_scale": scale.get("model", 1.0)})
        names = [g["name"] for g in groups]
        unknown = set(scale) - set(names)
        if unknown:
            raise InputError(
                "lr_scale",
                f"names {sorted(unknown)}, which have no trainable weights here; trainable: {names}",
            )
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.param_groups())
        for group in optimizer.param_groups:
            group["lr"] *= group["lr_scale"]
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_ratio * total))
        min_ratio = self.hparams.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def bundle(self) -> Bundle | None:
        """The record a checkpoint carries so that inference rebuilds the model without this task (None for
        a model that is neither a `LamedModel` nor a `ClipModel`, as a test's toy)."""
        if not hasattr(self.model, "tokenizer") and not hasattr(self.model, "text_tokenizer"):
            return None
        preprocessing, data = self._data_record
        return describe_model(
            self.model,
            preprocessing=preprocessing,
            data=data,
            task=f"{type(self).__module__}.{type(self).__qualname__}",
            llm_path=self.hparams.get("llm_path"),
            llm_weights=(self.base_fingerprint.get("llm") or {}).get("weights"),
            text_path=self.hparams.get("text_path"),
            text_max_length=self.hparams.get("text_max_length"),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the model's bundle (what `eval`, `ask` and the other commands rebuild it from)."""
        bundle = self.bundle()
        checkpoint["m3d_lit"] = {
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
            "bundle": None if bundle is None else bundle.to_dict(),
        }
        self._save_reliability(checkpoint)

    # -- exact resume and frozen-base checks (tasks/checkpoints.py) ----------------------------------
    def _init_reliability(self) -> None:
        self.base_fingerprint = base_fingerprint(self)
        self._pending_rng: list[dict[str, Any]] | None = None
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is not None and tokenizer.eos_token_id is None:
            # the answers end with EOS; without it the collator fails later with no file named
            where = self.hparams.get("llm_path") or "built-in tokenizer"
            raise InputError(where, "the tokenizer has no EOS token (set eos_token in tokenizer_config.json)")

    def _save_reliability(self, checkpoint: dict[str, Any]) -> None:
        """Record the model fingerprint and every rank's RNG states; leave out the rebuildable frozen LLM."""
        record = checkpoint["m3d_lit"]
        record["base"] = self.base_fingerprint
        states = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            record["rng"] = gathered
        else:
            record["rng"] = [states]
        state = checkpoint.get("state_dict")
        omitted = frozen_base_keys(self) if isinstance(state, dict) else []
        for key in omitted:
            state.pop(key, None)
        record["omitted"] = omitted

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        restore_frozen_base(path or "checkpoint", checkpoint, self)
        self._pending_rng = (checkpoint.get("m3d_lit") or {}).get("rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not at load time, so nothing between the restore and this step draws from them.
        if self._pending_rng:
            set_rng_states(self._pending_rng[self.global_rank % len(self._pending_rng)])
        self._pending_rng = None

    def tensorboard(self) -> Any | None:
        """The TensorBoard SummaryWriter when that logger is in use (images and text go there)."""
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None
