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

import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from m3d_lit.commands import LIGHTNING_COMMANDS
from m3d_lit.commands.lightning_help import HELP_ALL, asks_for_help, print_short_help
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
from m3d_lit.tasks.base import BaseTask, check_data_size
from m3d_lit.tasks.callbacks import PredictionWriter

__all__ = [
    "M3dLightningCLI",
    "check_launch",
    "check_paths",
    "check_resume",
    "fold_optimizer_options",
    "hardware_problem",
    "one_line",
    "optimizer_flags_to_model",
    "place_run",
]

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


def hardware_problem(config: Namespace, err: Exception) -> InputError:
    """What a trainer preset asked of hardware this machine does not have, in one line."""
    trainer = config.get("trainer") or Namespace()
    accelerator = str(trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return InputError(
            "--trainer.accelerator",
            f"{accelerator!r} (set by a GPU preset: gpu1, ddp_8x4090, ddp_nvlink, fsdp, zero2_8x4090) needs "
            "a CUDA GPU, and torch sees none here: use -c cpu on this machine, or run on a GPU machine",
        )
    return InputError("--trainer", one_line(str(err))[1])


def check_launch(trainer: Any) -> None:
    """Refuse a run whose processes would not make up the world the launcher started.

    torchrun and SLURM start the processes themselves; Lightning's own launcher only starts those of one
    machine. `num_nodes` x `devices` must be that world, else every rank shards the data for a world
    that does not exist.
    """
    env = trainer._accelerator_connector.cluster_environment
    nodes, devices = trainer.num_nodes, trainer.num_devices
    strategy = trainer.strategy
    if getattr(strategy, "requires_several_processes", False) and nodes * devices < 2:
        raise InputError(
            "--trainer.strategy",
            f"{type(strategy).__name__} shards the model over processes, and this run has one "
            f"(num_nodes {nodes} x devices {devices}): use -c gpu1 on one GPU, -c cpu on a CPU",
        )
    if isinstance(env, TorchElasticEnvironment):
        world, local = env.world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", devices))
        if nodes * devices != world or local != devices:
            raise InputError(
                "--trainer.num_nodes",
                f"{nodes} x devices {devices} disagrees with torchrun, which started {world} processes, "
                f"{local} per machine: pass --trainer.num_nodes {max(1, world // max(local, 1))} and "
                f"--trainer.devices {local} (or torchrun --nproc-per-node {devices})",
            )
    elif isinstance(env, SLURMEnvironment):
        try:
            env.validate_settings(num_devices=devices, num_nodes=nodes)
        except ValueError as err:
            raise InputError("--trainer.num_nodes", f"disagrees with SLURM: {err}") from None
    elif nodes > 1 and "NODE_RANK" not in os.environ and not env.creates_processes_externally:
        raise InputError(
            "--trainer.num_nodes",
            f"{nodes} machines, but nothing says which one this is: start each with torchrun --nnodes "
            f"{nodes} --node-rank R ..., with srun under SLURM, or set NODE_RANK, MASTER_ADDR and "
            "MASTER_PORT (README: Train on GPUs)",
        )


def _cause(err: BaseException | None) -> InputError | None:
    """The `InputError` a library error was raised from, if any."""
    while err is not None and not isinstance(err, InputError):
        err = err.__cause__ or err.__context__
    return err


def _did_you_mean(parser: Any, problem: str) -> str:
    """For `unrecognized arguments: --trainer.max_step 5`: the options of that name's command it is close to."""
    found = re.search(r"unrecognized arguments: (--[\w.]+)", problem)
    if found is None:
        return ""
    options: set[str] = set(parser._option_string_actions)
    for subparser in getattr(parser._subcommands_action, "_name_parser_map", {}).values():
        options |= set(subparser._option_string_actions)
    close = difflib.get_close_matches(found.group(1), sorted(options), n=2, cutoff=0.8)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _accepted(problem: str) -> str:
    """For `Problem with given class_path 'X': Option 'y' is not accepted`: the close names X takes."""
    found = re.search(r"class_path '([\w.]+)': Option '(\w+)' is not accepted", problem)
    if found is None:
        return ""
    path, option = found.groups()
    if option in ("lr", "learning_rate", "weight_decay"):
        return f" (the optimizer's settings: --model.optimizer.{option} or --optimizer.{option})"
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return ""
    accepted = {p for klass in cls.__mro__ if "__init__" in vars(klass)
                for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")}  # fmt: skip
    close = [name for name in sorted(accepted) if name.startswith(option)][:2]
    close = close or difflib.get_close_matches(option, sorted(accepted), n=2, cutoff=0.7)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def optimizer_flags_to_model(argv: list[str]) -> list[str]:
    """`--optimizer X`, `--optimizer.lr 1e-4` (also with `=`) -> the same for `--model.optimizer`.

    The task's optimizer argument then takes them as jsonargparse takes any nested class: the same class
    keeps the recipe's other arguments (its weight decay 0.0 stays), another class starts from its own
    defaults, and `--print_config` shows the result. A top-level `optimizer:` in a YAML file is moved by
    `fold_optimizer_options`.
    """
    out = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if flag == "--optimizer" or flag.startswith("--optimizer."):
            arg = "--model." + flag[2:] + sep + value
        out.append(arg)
    return out


def check_resume(trainer: Any, ckpt_path: str | None, stage: Path | None = None) -> None:
    """`--ckpt_path last` that found nothing to resume is a mistake: Lightning would start a new run in
    silence (it lets `last` stand for "nothing yet" on a first start). `place_run` has already replaced
    `last` by the latest checkpoint of the stage's runs where there is one."""
    if ckpt_path != "last":
        return
    folders = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    if any(path.exists() for folder in folders for path in folder.glob("last*.ckpt")):
        return
    where = ", ".join(sorted({str(folder) for folder in folders})) or str(stage or "any run of this stage")
    raise InputError(
        "--ckpt_path",
        f"last: there is no checkpoint to resume in {where}: leave --ckpt_path out to start a new run",
    )


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
        # `--trainer.max_step 5` is a typo, not `--trainer.max_steps`: argparse would take the prefix
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, (dict, Namespace)) else []
        wanted = asks_for_help(argv)
        if wanted == "--help":  # the recipes' options with the values given, then no run
            print_short_help(parser, argv, lambda message: ": ".join(one_line(message)))
        if wanted == HELP_ALL:  # LightningCLI's own help, every Trainer option
            args = [("--help" if arg == HELP_ALL else arg) for arg in argv]
        # checked here, before the seed is set or anything is built, so a refusal is the only output
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            option, problem = one_line(str(err))
            raise InputError(option, problem + _did_you_mean(parser, problem) + _accepted(problem)) from None
        config = self._subcommand_config()
        fold_optimizer_options(config)
        _check_preset(config)
        check_paths(config)
        if place_run(config, str(self.config.get("subcommand"))):
            # the run's config.yaml stays the one it started with; the resumption's is saved beside it
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": RESUMED_CONFIG}

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # Everything the run needs is checked before it starts: then the trainer creates its log folder
        # and writes its config there. The model (on the meta device), the hardware and the launcher
        # first, the data (which may be slow to list) last.
        stage = self.subcommand
        skeleton = None
        if isinstance(self.model, BaseTask):  # the model itself is built by the trainer, on each rank
            fresh_fit = stage == "fit" and not self._subcommand_config().get("ckpt_path")
            try:
                skeleton = self.model.preflight(fresh_fit)
            except InputError as err:  # a setting of the task is named as the option that sets it
                if err.path in self.model.hparams:
                    raise InputError(f"--model.{err.path}", err.problem) from None
                raise
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:
            raise hardware_problem(self._subcommand_config(), err) from None
        check_launch(trainer)
        logger = _logger_args(self._subcommand_config())
        stage_folder = Path(logger.save_dir) / str(logger.name) if logger is not None else None
        check_resume(trainer, self._subcommand_config().get("ckpt_path"), stage_folder)
        if stage in ("fit", "validate", "test", "predict") and self.datamodule is not None:
            self.datamodule.setup(stage)
            if skeleton is not None:
                check_data_size(skeleton, self.datamodule)
        if stage == "predict" and not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter())
        _plain_progress_bar(trainer)
        return trainer

    def after_fit(self) -> None:
        """Say where the run went: its folder, its newest checkpoint, how to look at its logs."""
        trainer = self.trainer
        log_dir = trainer.log_dir  # a broadcast from rank 0: every rank asks, or rank 0 waits alone
        if not trainer.is_global_zero:
            return
        run = Path(log_dir) if log_dir else None
        parts = [f"run {run}" if run else "no log folder (logger off)"]
        try:  # the checkpoint the next stage's init_from and eval take from this run
            parts.append(f"checkpoint {resolve_checkpoint(run).path}" if run else "no checkpoint written")
        except InputError:
            parts.append("no checkpoint written")
        if run is not None:
            parts.append(f"logs: tensorboard --logdir {run.parent.parent if run.parent.name else run}")
        print(f"m3d-lit fit: {'; '.join(parts)}", flush=True)

    def _subcommand_config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except InputError:
            raise
        except (ArgumentError, ValueError, TypeError, MisconfigurationException) as err:
            # what reaches here was raised by a constructor given the user's values; a task's or data
            # module's own refusal of one of its settings is named as the option that sets it
            cause = _cause(err)
            if cause is not None and re.fullmatch(r"[a-z_]+", cause.path):
                part = "--data" if "--data" in one_line(str(err))[0] else "--model"
                raise InputError(f"{part}.{cause.path}", cause.problem) from None
            option, problem = one_line(str(err))
            raise InputError(
                "--trainer" if isinstance(err, MisconfigurationException) else option, problem
            ) from None


def _plain_progress_bar(trainer: Any) -> None:
    """The progress bar without `v_num` (the run's folder says which version it is, and the bar showed it as
    a float, `v_num: 0.000`) and without Lightning's "Epoch 3/-2" when a run is bounded by steps only
    (`max_epochs` -1): the epoch alone is shown then."""
    bar = trainer.progress_bar_callback
    if bar is None:
        return
    metrics = bar.get_metrics
    bar.get_metrics = lambda *args, **kwargs: {k: v for k, v in metrics(*args, **kwargs).items() if k != "v_num"}
    describe = getattr(bar, "_get_train_description", None)  # RichProgressBar's; TQDM shows no maximum
    if describe is not None:

        def by_steps(epoch: int) -> str:
            if (trainer.max_epochs or 0) > 0:
                return describe(epoch)
            return f"Epoch {epoch}".ljust(len(bar.validation_description))  # as wide, so the bar stays put

        bar._get_train_description = by_steps


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_library_notices() -> None:
    """What a run prints that tells the user nothing about it: Lightning's advertisement for its cloud
    logger, a deprecation inside Lightning itself (a torch API it still calls), and torchmetrics' notice
    that a validation metric with nothing to measure (no `[SEG]` row) was computed before it was updated
    (such a value is not logged: `BaseTask.log_epoch_metrics`)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvertisements())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")


def run_lightning(argv: list[str] | None) -> None:
    """Run LightningCLI with the project's base classes in subclass mode (argv None: `sys.argv`).

    Every command reads the shared trainer block (`recipes.common_trainer()`) first, as a default config
    file: the recipes and options given override it.
    """
    defaults = {"default_config_files": [str(common_trainer())]}
    quiet_library_notices()
    M3dLightningCLI(
        BaseTask,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={command: defaults for command in LIGHTNING_COMMANDS},
        args=argv,
    )
