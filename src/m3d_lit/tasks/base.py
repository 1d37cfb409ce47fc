"""`BaseTask`: what every training stage shares.

A stage is a recipe (`stages/*.yaml`); a task is the LightningModule that runs it. Subclasses say how
their model is built in `build_model`, build their collator in `configure_collate`, and compute their
losses in `model_step`. The model is built in Lightning's `configure_model` hook, so on every rank it is
made once, on that rank's device and, for a frozen LLM, straight in the training dtype (the hook runs
inside the strategy's device and precision contexts); nothing is built in `__init__`. Code that uses a
task outside a trainer calls `configure_model()` itself. Moving weights between stages (`init_from`) and
resuming a stage (`--ckpt_path`) are kept apart: `init_from` is only read when a run starts fresh.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection

from m3d_lit.errors import InputError
from m3d_lit.inference.bundle import Bundle, describe_model
from m3d_lit.inference.checkpoints import read_checkpoint, resolve_checkpoint
from m3d_lit.models.blocks import checkpoint_parts
from m3d_lit.models.lamed import cast_for_training
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
from m3d_lit.tasks.strategies import shard_model

__all__ = ["EVAL_SPLITS", "BaseTask", "check_data_size", "warmup_cosine"]

EVAL_SPLITS = ("val", "test")


def check_data_size(model: nn.Module, datamodule: Any) -> None:
    """Refuse data prepared at another volume size than the model's: every source of the DataModule's
    `preprocessing` record (per source, as checkpoints keep it) must be at the model's size."""
    sources = getattr(datamodule, "preprocessing", None) if datamodule is not None else None
    want = tuple(int(s) for s in getattr(model, "img_size", ()))
    for name, settings in (sources or {}).items():
        size = (settings or {}).get("size")
        if size is not None and want and tuple(int(s) for s in size) != want:
            root = (getattr(datamodule, "roots", None) or [f"source {name}"])[0]
            raise InputError(
                root,
                f"source {name!r} was prepared at size {list(size)}, but the model takes {list(want)} "
                f"(every source of a run must be): prepare it again with `m3d-lit prepare ... --size "
                f"{' '.join(map(str, want))}`",
            )


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
        gradient_checkpointing: non-reentrant activation checkpointing: `none`, `all`, or parts joined
            by commas: `llm` (decoder layers), `vision` (ViT blocks), `seg` (segmentation encoder blocks),
            e.g. `vision,seg`; a stage ignores the parts it does not have.
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
        try:
            checkpoint_parts(gradient_checkpointing)
        except ValueError as err:
            raise InputError("gradient_checkpointing", str(err)) from None
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.model: nn.Module | None = None  # built by `configure_model`
        self._init_loaded = False
        self.base_fingerprint: dict[str, Any] | None = None
        self._pending_rng: list[dict[str, Any]] | None = None
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

    # -- what each stage provides -------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The stage's model with its trainability set, made on the default device; a frozen LLM in
        `llm_dtype()`. Under the meta device it must read no weights (a skeleton for `preflight`)."""
        raise NotImplementedError

    def on_model_ready(self, fresh_fit: bool) -> None:
        """After the model is built and `init_from` is loaded, before the frozen weights are cast:
        a stage's own starting weights (`fresh_fit`: a new training run, not a resume or evaluation)."""

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

    def llm_dtype(self) -> torch.dtype | None:
        """The dtype a frozen (or LoRA-adapted) LLM is made in: bf16 under a bf16 precision, else the
        default dtype the precision sets (fp32, or fp64 under `64-true`); a fully trained LLM keeps the
        default dtype for its optimizer. Outside a trainer: None (the saved dtype)."""
        if self._trainer is None:
            return None
        frozen = self.trainable_config().get("llm", "frozen") in ("frozen", "lora")
        if frozen and str(self.trainer.precision).startswith("bf16"):
            return torch.bfloat16
        return torch.get_default_dtype()

    def configure_model(self) -> None:
        """Build the model (once), then ready it for this trainer run: weights to start from on a fresh
        fit, the collator for the DataModule, synchronised batch norm, frozen weights in bf16.

        Lightning calls this inside the strategy's device and precision contexts, so every tensor is made
        where and how it trains; outside a trainer it builds on the current default device."""
        if self.model is None:
            # on the rank's own device (ModelParallelStrategy leaves the default device as it is)
            device = self.trainer.strategy.root_device if self._trainer is not None else None
            with torch.device(device) if device is not None else contextlib.nullcontext():
                model = self.build_model()
            self._check_model(model)
            self.model = model
            self.base_fingerprint = base_fingerprint(self)
        if self._trainer is not None:
            self._ready_for(self.trainer)

    def _check_model(self, model: nn.Module) -> None:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None and tokenizer.eos_token_id is None:
            # the answers end with EOS; without it the collator fails later with no file named
            where = self.hparams.get("llm_path") or "built-in tokenizer"
            raise InputError(where, "the tokenizer has no EOS token (set eos_token in tokenizer_config.json)")
        self.param_groups(model)  # an lr_scale naming no trainable part is refused before any step

    def _ready_for(self, trainer: Any) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        fresh_fit = fitting and not trainer.ckpt_path
        if fitting and self.hparams.init_from and trainer.ckpt_path:
            rank_zero_info(f"resuming from {trainer.ckpt_path}: init_from is not read")
        if fresh_fit and self.hparams.init_from and not self._init_loaded:
            self.load_init_weights(self.hparams.init_from)
        self.on_model_ready(fresh_fit)
        datamodule = getattr(trainer, "datamodule", None)
        check_data_size(self.model, datamodule)
        if datamodule is not None:
            if not hasattr(datamodule, "set_collator"):
                raise TypeError(
                    f"{type(datamodule).__name__} has no set_collator(collate): derive the DataModule from "
                    "m3d_lit.data.datamodules.BaseDataModule, which batches with the task's collator"
                )
            # predicting hands the samples themselves to `predict_step`: the Predictor batches them
            predicting = trainer.state.fn == TrainerFn.PREDICTING
            datamodule.set_collator(list if predicting else self.configure_collate())
            # read once per run (the data do not change under it), recorded in every checkpoint's bundle
            self._data_record = (dict(datamodule.preprocessing or {}), datamodule.fingerprint())
        # `sync_batchnorm=True` converts torch's batch norms; the perceiver's synchronises itself
        sync = getattr(trainer.strategy, "_layer_sync", None) is not None
        if set_batchnorm_sync(self, sync) and sync:
            rank_zero_info("sync_batchnorm: the perceiver's batch norm takes its statistics over all ranks")
        bf16 = str(trainer.precision).startswith("bf16")
        if bf16:
            # bf16-mixed keeps fp32 weights: for a frozen 7B LLM that is 25 GiB, more than a 24 GB card.
            # Frozen weights are bf16 (the LLM was made so), the trainable ones fp32 for the optimizer.
            cast_for_training(self.model, torch.bfloat16)
        if isinstance(trainer.strategy, ModelParallelStrategy):
            shard_model(self.model, trainer.strategy.device_mesh, torch.bfloat16 if bf16 else None)

    def preflight(self, fresh_fit: bool = True) -> nn.Module:
        """Check what a run would fail on before it writes anything, without memory: the model is built
        on the meta device (no weights read) and checked, with `init_from`'s tensor names and shapes
        against it on a fresh fit. Returns that skeleton (the data's size is checked against it once the
        DataModule is set up: `check_data_size`)."""
        with torch.device("meta"):
            skeleton = self.build_model()
        self._check_model(skeleton)
        init_from = self.hparams.init_from
        # an M3D-LaMed directory given as init_from is what the model is built from (`AlignTask`)
        if fresh_fit and init_from and Path(init_from) != Path(self.hparams.get("llm_path") or ""):
            own = {f"model.{key}": value for key, value in skeleton.state_dict().items()}
            self.init_weights_plan(init_from, own)
        return skeleton

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
        own = self.state_dict()
        checkpoint, wanted = self.init_weights_plan(path, own)
        source = checkpoint["state_dict"]
        check_init_source(path, checkpoint, self)
        self.load_state_dict({k: source[k] for k in wanted}, strict=False)
        self._init_loaded = True
        self.init_summary, text = summarise_init(own, source, wanted, self.hparams.get("llm_path"))
        rank_zero_info(f"init_from {path}: {text}")

    def init_weights_plan(self, path: str | Path, own: dict[str, Tensor]) -> tuple[dict[str, Any], list[str]]:
        """(the checkpoint, the keys of `own` to take from it): the required prefixes must all be there
        with this model's shapes; with `init_prefixes` unset every other key that fits is taken too."""
        prefixes = tuple(self.hparams.init_prefixes or self.default_init_prefixes)
        resolved = resolve_checkpoint(path)
        if resolved.how:
            rank_zero_info(f"init_from {resolved.how}")
        path = resolved.path
        checkpoint = read_checkpoint(path)
        source = checkpoint.get("state_dict")
        if not isinstance(source, dict):
            raise InputError(path, "has no state_dict: not a Lightning checkpoint of m3d-lit")
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
        return checkpoint, wanted

    def global_shares(self, counts: Tensor) -> Tensor | None:
        """Under data parallelism, what turns each rank's mean into its share of the global batch's mean.

        A rank's loss term is a mean over its own `counts` items (answer tokens, mask rows); the
        gradients of the ranks are averaged. Scaling each rank's mean by `count_r x world / sum of counts`
        makes that average the gradient of the mean over every item of the global batch, which is what
        one process computes on the same batch, whatever the ranks' shares. None with a single rank (the
        mean is already that); 0 for a term no rank has items of.
        """
        world = self.trainer.world_size
        if world <= 1:
            return None
        counts = counts.detach().to(torch.float64)
        total = counts.clone()
        torch.distributed.all_reduce(total)  # no barrier: the host does not wait for the device here
        return torch.where(total > 0, counts * world / total.clamp(min=1.0), torch.zeros_like(counts))

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

    def is_log_step(self) -> bool:
        """Whether Lightning writes this training step's logged values (the check its own
        `LearningRateMonitor` makes): it reads them on the host, a wait for the device, only then."""
        trainer = self._trainer
        return trainer is not None and bool(trainer._logger_connector.should_update_logs)

    def log_loss(self, split: str, loss: Tensor, batch_size: int) -> None:
        """`<split>/loss`, shown in the progress bar.

        Lightning turns every progress-bar value into a Python number after each batch, which makes the
        host wait for the device. In training the loss is therefore handed over only at the steps that are
        logged, already on the host; the logs hold the same values as before (Lightning writes a step's
        values only at those steps), and the bar shows the loss of the last logged step.
        """
        self.log_term(split, "loss", loss, batch_size, prog_bar=True)

    def log_term(self, split: str, name: str, value: Tensor, batch_size: int, prog_bar: bool = False) -> None:
        """Log `<split>/<name>`: evaluation terms averaged over the ranks; a training term at the logged
        steps only, as a host value, and under data parallelism the mean of the ranks' shares, which is the
        global batch's (`global_shares`) or, for a loss every rank computes whole (stage 1), the loss."""
        if split != "train":
            self.log(f"{split}/{name}", value, batch_size=batch_size, prog_bar=prog_bar, sync_dist=True)
        elif self.is_log_step():
            value = value.detach()
            if self.trainer.world_size > 1:
                value = self.trainer.strategy.reduce(value.clone(), reduce_op="mean")
            self.log(f"train/{name}", value.cpu(), batch_size=batch_size, prog_bar=prog_bar)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Only at logged steps, and as one device tensor (Lightning's `grad_norm` copies each norm to
        # the host): nothing here makes the other steps wait for the device.
        if not self.is_log_step():
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            # the norm of sharded (DTensor) gradients is itself sharded until made whole
            total = total.full_tensor() if hasattr(total, "full_tensor") else total
            self.log("train/grad_norm", total, on_step=True, on_epoch=False)

    def param_groups(self, model: nn.Module | None = None) -> list[dict[str, Any]]:
        """One optimizer group per top-level part with trainable weights, each with its `lr_scale`."""
        model = self.model if model is None else model
        scale = self.hparams.lr_scale or {}
        groups = []
        for name, module in model.named_children():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "name": name, "lr_scale": scale.get(name, 1.0)})
        direct = [p for n, p in model.named_parameters(recurse=False) if p.requires_grad]
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
            llm_weights=(self.base_fingerprint.get("llm") or {}).get("weights_bf16"),
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
