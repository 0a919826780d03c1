"""Strict construction of the data pipeline's config dataclasses from plain mappings (YAML).

Every config in `data/` is a frozen dataclass whose fields carry a comment; `from_mapping`
builds one from a dict and turns typos into errors instead of silently ignored keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any], *, where: str = "") -> T:
    """Build dataclass `cls` from `values`; unknown keys raise ValueError naming them."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{where or cls.__name__}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}"
        )
    kwargs = dict(values)
    for f in dataclasses.fields(cls):
        # Tuples come back from YAML as lists; keep configs hashable and immutable.
        if f.name in kwargs and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    return cls(**kwargs)


def to_mapping(config: Any) -> dict[str, Any]:
    """The inverse of `from_mapping`: a plain dict (tuples as lists) fit for JSON or YAML."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
