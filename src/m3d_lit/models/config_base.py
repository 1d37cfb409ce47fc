"""The machinery of the typed model configuration (`models/config.py`): a section's dict form, its
read-only `Mapping` view, and the checks every section's `__post_init__` runs (each raises a one-line
`InputError` naming the setting).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from m3d_lit.errors import InputError

__all__ = ["Section", "choice", "deep_merge", "divides", "field_default", "number", "positive_int", "triple"]


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `update` merged in; nested mappings merge, other values replace."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def positive_int(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(where, f"{value!r} must be a positive integer")


def number(where: str, value: Any, low: float = 0.0, high: float | None = None) -> None:
    """A real number in [low, high) (no upper bound when `high` is None)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise InputError(where, f"{value!r} must be a number {bound}")


def choice(where: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InputError(where, f"{value!r} is not one of {list(choices)}")


def divides(where: str, hidden: int, heads: int) -> None:
    if hidden % heads:
        raise InputError(where, f"hidden_size {hidden} is not divisible by num_heads {heads}")


def triple(where: str, value: Any) -> None:
    items = [value] if isinstance(value, int) else value
    if not isinstance(items, Sequence) or isinstance(items, str) or len(items) not in (1, 3):
        raise InputError(where, f"{value!r} must be an integer or three integers")
    for item in items:
        positive_int(where, item)


class Section(Mapping):
    """Shared behaviour: the dict form (`to_dict`, `from_dict`) and a read-only `Mapping` view of it."""

    _SAVED_IF_SET: ClassVar[frozenset[str]] = frozenset()
    _SECTION: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The plain nested dict (what checkpoints and `overrides` hold)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "extra":
                out.update(value)
                continue
            if f.name in self._SAVED_IF_SET and value == field_default(f):
                continue
            out[f.name] = value.to_dict() if isinstance(value, Section) else value
        return out

    @classmethod
    def names(cls) -> set[str]:
        """The settings this section declares."""
        return {f.name for f in dataclasses.fields(cls) if f.name != "extra"}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Build from a dict; keys it does not declare go to `extra` where there is one, else are refused."""
        if isinstance(data, cls):
            return data
        where = cls._SECTION or "model config"
        if not isinstance(data, Mapping):
            raise InputError(where, f"must be a mapping of settings, got {data!r}")
        known = cls.names()
        values = {k: v for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown and "extra" not in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
            raise InputError(where, f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
        if unknown:
            values["extra"] = unknown
        try:
            return cls(**values)
        except TypeError as err:  # a required setting missing
            raise InputError(where, f"cannot be built: {err}") from None

    # -- the read-only Mapping view of `to_dict()` --------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default
