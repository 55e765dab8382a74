"""Frozen config dataclasses from dicts (parsed YAML, JSON): unknown keys are an error, never dropped."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def unknown_keys(cls: type, d: Mapping[str, Any]) -> list[str]:
    """Keys of `d` that are not init fields of dataclass `cls`, sorted."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    return sorted(set(d) - known)


def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """`cls(**d)`, refusing unknown keys with the valid ones in the error."""
    unknown = unknown_keys(cls, d)
    if unknown:
        known = sorted(f.name for f in dataclasses.fields(cls) if f.init)  # type: ignore[arg-type]
        raise ValueError(f"{cls.__name__}: expected keys among {known}, got unknown keys {unknown}")
    return cls(**d)
