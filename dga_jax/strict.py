"""Frozen dataclass configs from plain values: the one check of unknown keys and types.

    build(ModelConfig, {"d_model": 64, "dga": {"group_size": 8}}, "model.")

Every key must be a field; every value must have the field's type (int, float, str, bool,
`X | None`, `tuple[str, ...]`, `dict[str, Any]`, or a nested dataclass given as a dict). An int
is accepted for a float. Anything else raises `ConfigError` naming the key with `prefix`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from dga_jax.errors import ConfigError

T = TypeVar("T")


def build(kind: type[T], values: Mapping[str, Any], prefix: str) -> T:
    """`kind(**values)` once every key and value is checked against `kind`'s fields."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a dict, got {values!r}")
    known = {field.name for field in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(known)}"
        )
    hints = typing.get_type_hints(kind)
    checked = {key: check(prefix + key, value, hints[key]) for key, value in values.items()}
    return kind(**checked)


def check(key: str, value: Any, expected: Any) -> Any:
    """`value` as the type `expected`, or a `ConfigError` naming `key`."""
    if dataclasses.is_dataclass(expected) and isinstance(expected, type):
        return value if isinstance(value, expected) else build(expected, value, key + ".")
    origin = typing.get_origin(expected)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a dict, got {value!r}")
        return dict(value)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a tuple, got {value!r}")
        return tuple(check(key, item, typing.get_args(expected)[0]) for item in value)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        expected = next(option for option in options if option is not type(None))
        return check(key, value, expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected in (int, float)):
        got = f"{type(value).__name__} {value!r}"
        raise ConfigError(f"{key} must be {expected.__name__}, got {got}")
    return value
