"""LightningCLI for the training recipes, with the checks a recipe needs before anything is built.

LightningCLI's automatic `--optimizer` would replace the task's `configure_optimizers` (per-component
`lr_scale` groups, warm-up + cosine) with a bare optimizer over all parameters and only a warning. Here
`--optimizer` becomes the task's `model.optimizer`, so the groups and the schedule stay; `--lr_scheduler`
is refused with the options that shape the task's own schedule.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from m3d_lit.errors import InputError

__all__ = ["M3dLightningCLI", "fold_optimizer_options"]

SCHEDULE_OPTIONS = (
    "the task schedules the learning rate itself (linear warm-up, then cosine decay, per step, with "
    "per-component lr_scale): set --model.warmup_ratio, --model.min_lr_ratio and --model.lr_scale, and the "
    "peak rate with --model.optimizer.lr"
)


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
        raise InputError("--optimizer", "this model takes no optimizer argument; set it under --model instead")
    replaced = init_args.get("optimizer")
    init_args.optimizer = optimizer.clone()
    config.optimizer = None
    was = f", replacing model.optimizer {_describe(replaced)}" if isinstance(replaced, Namespace) else ""
    rank_zero_info(
        f"--optimizer: {_describe(optimizer)}{was}; the task keeps its lr_scale groups and warm-up + cosine"
    )


class M3dLightningCLI(LightningCLI):
    """LightningCLI whose configuration is checked and completed before the classes are built."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # checked here, before the seed is set or anything is built, so a refusal is the only output
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        fold_optimizer_options(self.config[subcommand] if subcommand else self.config)
