"""Strict dataclasses from plain mappings: the one builder behind every config of the project.

    config = build(RunConfig, yaml.safe_load(text))          # launcher: the run config
    config = build(ModelConfig, json.loads(text), "model")   # a pretrained directory's model
    config = build(StreamConfig, values, "stream")           # data: every frozen config

An unknown key at any depth is a ``ConfigError`` with a "did you mean" hint and the keys known
there; a value of the wrong type names its dotted key. Nested dataclass fields are built
recursively; lists become tuples for tuple fields (frozen configs stay hashable). ``plain`` is the
inverse, a dict fit for JSON or YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Mapping, TypeVar

from performer.errors import ConfigError

T = TypeVar("T")


def build(cls: type[T], values: Mapping[str, Any], path: str = "", renamed: Mapping[str, str] | None = None) -> T:
    """Dataclass ``cls`` from ``values``; unknown keys and wrong types are ConfigErrors naming the key.
    ``renamed``: dotted keys that were renamed -> what to use instead (the error says so)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(values).__name__}: {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key_error(str(key), path, list(fields), renamed)
        where = f"{path}.{key}" if path else str(key)
        kwargs[key] = _field_value(value, hints[key], where, renamed)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path or 'config'}: {error}") from error


def plain(config: Any) -> dict[str, Any]:
    """The inverse of ``build``: nested dicts, tuples as lists."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def unknown_key_error(key: str, path: str, known: list[str], renamed: Mapping[str, str] | None = None) -> ConfigError:
    where = f"{path}.{key}" if path else key
    if renamed and where in renamed:
        return ConfigError(f"config key {where!r} was renamed: use {renamed[where]}")
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    suggestion = f"; did you mean {(path + '.' if path else '') + hint[0]!r}?" if hint else ""
    return ConfigError(f"unknown config key {where!r}{suggestion} (known here: {', '.join(sorted(known))})")


def _field_value(value: Any, annotation: Any, where: str, renamed: Mapping[str, str] | None) -> Any:
    value = _yaml_float(value, annotation)
    if dataclasses.is_dataclass(annotation):
        # An empty section (`log:` with nothing under it) is its defaults; 0, [] or false are errors.
        return build(annotation, {} if value is None else value, where, renamed)
    if typing.get_origin(annotation) is tuple and isinstance(value, (list, tuple)):
        item = typing.get_args(annotation)[0] if typing.get_args(annotation) else None
        if dataclasses.is_dataclass(item):  # tuple[Section, ...]: a list of sections
            return tuple(_field_value(v, item, f"{where}[{i}]", renamed) for i, v in enumerate(value))
        value = tuple(value)
    if not type_matches(value, annotation):
        expected = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"{where} must be of type {expected}, got {type(value).__name__}: {value!r}")
    # 60 and 60.0 are the same value: store a float so fingerprints do not depend on the spelling.
    return float(value) if _is_float_field(annotation) and value is not None else value


def type_matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (dict, list, str, bool, tuple) or origin in (dict, list, tuple):
        return isinstance(value, origin or annotation)
    return True


_FLOAT_LITERAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _yaml_float(value: Any, annotation: Any) -> Any:
    """PyYAML reads `1e-3` (no exponent sign, YAML 1.1) as a string: take it as the number it is."""
    if isinstance(value, str) and _is_float_field(annotation) and _FLOAT_LITERAL.match(value.strip()):
        return float(value)
    return value


def _is_float_field(annotation: Any) -> bool:
    """float or float | None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return float in typing.get_args(annotation)
    return annotation is float
