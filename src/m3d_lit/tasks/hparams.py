"""Hyperparameters in TensorBoard's HPARAMS tab, paired with metrics the run logs anyway."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["flatten_hparams", "write_hparams"]


def flatten_hparams(params: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested hyperparameters as `{"a/b": value}` with values TensorBoard accepts.

    Numbers, strings and booleans stay as they are; None becomes `"None"` (TensorBoard would drop the
    key, hiding that it was unset) and anything else (lists, classes) its `str`.
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def write_hparams(writer: Any, params: Mapping[str, Any], metrics: Sequence[str]) -> None:
    """Write the HPARAMS summaries of a run into its own event file.

    `metrics` are scalar tags the run logs itself (e.g. `val/loss`): TensorBoard shows their last value
    beside the hyperparameters. Lightning's `log_hyperparams(params, metrics)` would also write a
    placeholder value under each metric tag at step 0, which would then appear in the real curves.

    Args:
        writer: the run's `torch.utils.tensorboard.SummaryWriter` (or tensorboardX's).
        params: hyperparameters, possibly nested.
        metrics: scalar tags to pair with them.
    """
    from torch.utils.tensorboard.summary import hparams

    if not metrics:
        raise ValueError("write_hparams needs at least one metric tag")
    # the metric values given to `hparams` only name the tags; they are not written
    for summary in hparams(flatten_hparams(params), dict.fromkeys(metrics, 0.0)):
        writer.file_writer.add_summary(summary)
    writer.flush()
