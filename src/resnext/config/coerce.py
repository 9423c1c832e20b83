"""Typed conversion of raw values (TOML values or `key=value` strings) to a config field's type."""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Any

from resnext.errors import ConfigError


def type_name(tp: Any) -> str:
    """A readable name of a field type, for error messages."""
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _from_text(key: str, text: str, tp: Any) -> Any:
    """Parse the text of a command-line override: JSON-like literals, else the bare string."""
    stripped = text.strip()
    if tp is str:
        return stripped
    if tp is bool:
        low = stripped.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected bool (true/false), got {text!r}")
    if typing.get_origin(tp) is tuple:
        if stripped.startswith("["):
            try:
                return json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: expected a list like [1,2], got {text!r}") from exc
        return [part.strip() for part in stripped.split(",") if part.strip()]
    if tp is dict or typing.get_origin(tp) is dict:
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: expected a JSON object, got {text!r}") from exc
    if tp is int:
        try:
            return int(stripped)
        except ValueError as exc:
            raise ConfigError(f"{key}: expected int, got {text!r}") from exc
    if tp is float:
        try:
            return float(stripped)
        except ValueError as exc:
            raise ConfigError(f"{key}: expected float, got {text!r}") from exc
    return stripped


def coerce(key: str, value: Any, tp: Any, *, text: bool = False) -> Any:
    """`value` converted to `tp`, or a ConfigError naming `key` and the expected type.

    With `text`, a string value is parsed first (command-line overrides); file values keep their type.
    """
    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (
            text and isinstance(value, str) and value.strip().lower() in ("none", "null")
        ):
            return None
        return coerce(key, value, inner, text=text)
    if text and isinstance(value, str) and inner is not str:
        value = _from_text(key, value, inner)
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}")
        return value
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    if typing.get_origin(inner) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of int, got {type(value).__name__}")
        (elem,) = typing.get_args(inner)[:1]
        return tuple(coerce(f"{key}[{i}]", v, elem, text=text) for i, v in enumerate(value))
    if inner is dict or typing.get_origin(inner) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {type_name(inner)}")
