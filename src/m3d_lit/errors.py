"""Errors that reach the user as one clear line."""

from __future__ import annotations

from os import PathLike

__all__ = ["InputError", "TrainingError"]


class InputError(ValueError):
    """A bad input file or folder: the message names it and says what is wrong.

    Args:
        path: the offending file or folder.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class TrainingError(RuntimeError):
    """A run that had to stop (e.g. a non-finite loss); the message says where and what to do."""
