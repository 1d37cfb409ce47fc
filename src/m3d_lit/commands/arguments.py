"""The argument parser of the `m3d-lit` tools: a mistake on the command line is one line and exit status 2.

argparse prints its usage screen and exits on its own; here its message becomes an `InputError` naming
the option, which `m3d-lit` prints as `m3d-lit <command>: error: <option>: <problem>` (`--help` still
prints the usage).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from m3d_lit.errors import InputError

__all__ = ["CommandParser", "json_object", "model_options"]


class CommandParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors raise `InputError` instead of printing usage and exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--m3d` must not silently mean `--m3d-shape`
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        named = re.match(r"argument ([^:]+): (.*)", message, flags=re.DOTALL)
        if named:
            option = named.group(1).split("/")[-1]
            raise InputError(option, named.group(2))
        raise InputError("arguments", message)


def json_object(text: str) -> dict[str, Any]:
    """An argparse `type`: a JSON object (argparse reports the problem with the option's name)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg} at column {err.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"llm\": {{...}}}}', got {text!r}")
    return value


@contextmanager
def model_options(option: str) -> Iterator[None]:
    """Building a model from a preset and the user's `--overrides`/`--trainable`: a `ValueError` there
    (a width not divisible by the heads, a pool that does not divide the grid...) is theirs to fix."""
    try:
        yield
    except InputError:
        raise
    except ValueError as err:
        raise InputError(option, f"the model cannot be built with these values: {err}") from None
