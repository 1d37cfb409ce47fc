"""LightningCLI for the training recipes: options checked before anything is built, mistakes in one line.

LightningCLI's automatic `--optimizer` would replace the task's `configure_optimizers` (per-component
`lr_scale` groups, warm-up + cosine) with a bare optimizer over all parameters and only a warning. Here
`--optimizer` becomes the task's `model.optimizer`, so the groups and the schedule stay; `--lr_scheduler`
is refused with the options that shape the task's own schedule.

jsonargparse reports a bad value as a usage screen and a nested, multi-line message (a bad value given to
a task's constructor also with a traceback); here each becomes an `InputError` of one line, which the
`m3d-lit` command prints and turns into exit status 2.
"""

from __future__ import annotations

import re
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from m3d_lit.commands import LIGHTNING_COMMANDS
from m3d_lit.data.datamodules import BaseDataModule
from m3d_lit.errors import InputError
from m3d_lit.inference.checkpoints import (
    CHECKPOINTS,
    latest_run,
    resolve_checkpoint,
    run_of,
    zero_checkpoint_problem,
)
from m3d_lit.models.official.lamed import is_official_lamed
from m3d_lit.models.presets import resolve
from m3d_lit.recipes import common_trainer
from m3d_lit.tasks.base import BaseTask
from m3d_lit.tasks.callbacks import PredictionWriter

__all__ = ["M3dLightningCLI", "check_paths", "fold_optimizer_options", "one_line", "place_run"]

SCHEDULE_OPTIONS = (
    "the task schedules the learning rate itself (linear warm-up, then cosine decay, per step, with "
    "per-component lr_scale): set --model.warmup_ratio, --model.min_lr_ratio and --model.lr_scale, and the "
    "peak rate with --model.optimizer.lr"
)
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:")
_PARTS = {"BaseTask": "--model", "BaseDataModule": "--data"}
RESUMED_CONFIG = "config.resumed.yaml"
# values of --ckpt_path that Lightning resolves itself rather than as a file
_CKPT_NAMES = {"last", "best", "hpc", "registry"}


def one_line(message: str) -> tuple[str, str]:
    """(option, problem) from a jsonargparse message: the nested causes, without the usage noise."""
    lines = [line.strip().removeprefix("- ").strip() for line in message.splitlines()]
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    # a constructor's error names no option; the union it failed in says whether it was the model or data
    subtypes = next((line for line in lines if line.startswith("Subtypes:")), "")
    option = next((flag for name, flag in _PARTS.items() if f".{name}'>" in subtypes), "configuration")
    kept = [
        line for line in lines
        if line and not line.startswith(_NOISE) and not line.startswith("Given value:")
        and line != "Expected a <class 'NoneType'>"
    ]  # fmt: skip
    if kept and (key := re.match(r'Parser key "([^"]+)":\s*(.*)', kept[0])):
        option = "-c/--config" if key.group(1) == "config" else f"--{key.group(1)}"
        kept = [key.group(2), *kept[1:]] if key.group(2) else kept[1:]
    expected = [line.removeprefix("Expected a ") for line in kept if line.startswith("Expected a ")]
    if expected and len(expected) == len(kept):
        text = "expected " + " or ".join(expected) + (f"; got {given}" if given else "")
    else:
        text = " ".join(kept)
    text = re.sub(r"typing\.Literal\[(.*?)\]", r"one of \1", text)
    return option, re.sub(r"<class '([\w.]+)'>", r"\1", text)


def _describe(optimizer: Namespace) -> str:
    args = optimizer.get("init_args") or Namespace()
    shown = ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items()))
    return f"{optimizer.class_path}({shown})"


def fold_optimizer_options(config: Namespace) -> None:
    """Move a top-level `optimizer` into `model.init_args.optimizer`; refuse a top-level `lr_scheduler`.

    `--optimizer X --optimizer.lr 1e-4` means what it means in any LightningCLI: optimizer X with the
    arguments given and X's defaults for the rest. It replaces the recipe's `model.optimizer` whole.
    """
    if config.get("lr_scheduler"):
        raise InputError("--lr_scheduler", SCHEDULE_OPTIONS)
    optimizer = config.get("optimizer")
    if not optimizer:
        return
    init_args = config.model.get("init_args") if isinstance(config.get("model"), Namespace) else None
    if init_args is None or "optimizer" not in init_args:
        raise InputError(
            "--optimizer", "this model takes no optimizer argument; set it under --model instead"
        )
    replaced = init_args.get("optimizer")
    init_args.optimizer = optimizer.clone()
    config.optimizer = None
    was = f", replacing model.optimizer {_describe(replaced)}" if isinstance(replaced, Namespace) else ""
    rank_zero_info(
        f"--optimizer: {_describe(optimizer)}{was}; the task keeps its lr_scale groups and warm-up + cosine"
    )


def check_paths(config: Namespace) -> None:
    """Files the run will read, checked before the run writes anything (its config, logs, checkpoints)."""
    init_args = config.model.get("init_args") if isinstance(config.get("model"), Namespace) else None
    init_args = init_args or Namespace()
    ckpt = config.get("ckpt_path")
    if ckpt and str(ckpt) not in _CKPT_NAMES and "://" not in str(ckpt) and not Path(ckpt).exists():
        raise InputError(
            ckpt, "--ckpt_path: checkpoint not found (or use --ckpt_path last to resume the newest)"
        )
    init_from = init_args.get("init_from")
    if (
        init_from and not ckpt and not is_official_lamed(init_from)
    ):  # an M3D-LaMed directory: the task reads it
        if not Path(init_from).exists():
            raise InputError(
                init_from,
                "--model.init_from: checkpoint not found (run the previous stage, or pass null to start "
                "fresh)",
            )
        try:
            resolved = resolve_checkpoint(init_from).path
            problem = zero_checkpoint_problem(resolved) if resolved.is_dir() else None
        except InputError as err:  # a folder holding no checkpoint
            problem = err.problem
        if problem:
            raise InputError(init_from, f"--model.init_from: {problem}")
    for key in ("llm_path", "text_path"):
        folder = init_args.get(key)
        if folder and not Path(folder).is_dir():
            raise InputError(folder, f"--model.{key}: directory not found")


def _logger_args(config: Namespace) -> Namespace | None:
    """The init_args of the run's logger when it names a run folder (`save_dir`/`name`/`version`)."""
    logger = (config.get("trainer") or Namespace()).get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    args = logger.get("init_args") if isinstance(logger, Namespace) else None
    return args if isinstance(args, Namespace) and args.get("save_dir") and args.get("name") else None


def place_run(config: Namespace, subcommand: str = "fit") -> bool:
    """Which run folder (`runs/<stage>/<run>/`) a command writes: a resumed `fit` continues in its own run,
    a new run never writes into one that holds checkpoints. Returns whether a run is continued.

    `--ckpt_path last` is the latest checkpoint of the stage's latest run (where no run of the stage holds
    one, Lightning's own rule stands: the newest `last.ckpt` of the checkpoint callbacks' folders), a run
    folder its latest checkpoint; with `fit`, a checkpoint inside a run of this stage continues that run
    (the logger's `version`). `validate`, `test` and `predict` write a folder of their own.
    """
    logger, ckpt = _logger_args(config), config.get("ckpt_path")
    stage = Path(logger.save_dir) / str(logger.name) if logger is not None else None
    run = latest_run(stage) if ckpt == "last" and stage is not None else None
    if run is not None:
        ckpt = config.ckpt_path = str(resolve_checkpoint(run).path)
    elif ckpt and str(ckpt) not in _CKPT_NAMES and Path(ckpt).is_dir():
        ckpt = config.ckpt_path = str(resolve_checkpoint(ckpt).path)
    run = run_of(ckpt) if ckpt and str(ckpt) not in _CKPT_NAMES else None
    if logger is None:
        return False
    if (
        subcommand == "fit"
        and run is not None
        and stage is not None
        and run.parent.resolve() == stage.resolve()
    ):
        logger.version = run.name
        rank_zero_info(f"resuming run {run} from {ckpt}")
        return True
    if not ckpt and logger.get("version") is not None:
        folder = stage / str(logger.version) / CHECKPOINTS
        if folder.is_dir() and any(folder.rglob("*.ckpt")):
            raise InputError(
                folder,
                "holds the checkpoints of an earlier run: a new run never writes over another's; choose "
                f"another --trainer.logger.init_args.version, or resume that run with --ckpt_path {folder.parent}",
            )
    return False


def _check_preset(config: Namespace) -> None:
    init_args = config.model.get("init_args") if isinstance(config.get("model"), Namespace) else None
    if init_args is not None and "preset" in init_args:
        resolve(init_args.preset, init_args.get("overrides"))


class M3dLightningCLI(LightningCLI):
    """LightningCLI whose configuration is checked and completed before the classes are built."""

    def init_parser(self, **kwargs: Any) -> Any:
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # checked here, before the seed is set or anything is built, so a refusal is the only output
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise InputError(*one_line(str(err))) from None
        config = self._subcommand_config()
        fold_optimizer_options(config)
        _check_preset(config)
        check_paths(config)
        if place_run(config, str(self.config.get("subcommand"))):
            # the run's config.yaml stays the one it started with; the resumption's is saved beside it
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": RESUMED_CONFIG}

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # Read what the run reads first: the trainer creates its log folder and writes its config there.
        stage = self.subcommand
        if stage in ("fit", "validate", "test", "predict") and self.datamodule is not None:
            self.datamodule.setup(stage)
        init_from = self.model.hparams.get("init_from") if self.model is not None else None
        if stage == "fit" and init_from and not self._subcommand_config().get("ckpt_path"):
            self.model.load_init_weights(init_from)
        trainer = super().instantiate_trainer(**kwargs)
        if stage == "predict" and not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter())
        return trainer

    def _subcommand_config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except InputError:
            raise
        except (ArgumentError, ValueError, TypeError, MisconfigurationException) as err:
            # what reaches here was raised by a constructor given the user's values
            option, problem = one_line(str(err))
            raise InputError(
                "--trainer" if isinstance(err, MisconfigurationException) else option, problem
            ) from None


def run_lightning(argv: list[str] | None) -> None:
    """Run LightningCLI with the project's base classes in subclass mode (argv None: `sys.argv`).

    Every command reads the shared trainer block (`recipes.common_trainer()`) first, as a default config
    file: the recipes and options given override it.
    """
    defaults = {"default_config_files": [str(common_trainer())]}
    M3dLightningCLI(
        BaseTask,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={command: defaults for command in LIGHTNING_COMMANDS},
        args=argv,
    )
