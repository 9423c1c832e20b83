"""Build a frozen Config from nested dicts: unknown keys refused, every value converted to its field type."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from typing import Any

from resnext.config.coerce import coerce
from resnext.config.schema import Config
from resnext.errors import ConfigError


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def build_section(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from `data`, missing fields left at their defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (in {where}; allowed: {', '.join(sorted(types_))})"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = types_[name]
        key = f"{prefix}{name}"
        if _is_section(tp):
            kwargs[name] = build_section(tp, value, f"{key}.")
        else:
            kwargs[name] = coerce(key, value, tp)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) of a config or config section."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, dict):
            out[f.name] = dict(value)
        else:
            out[f.name] = value
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, refusing paths that do not exist in the schema."""
    parts = key.split(".")
    cls: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        types_ = _field_types(cls)
        if part not in types_:
            prefix = ".".join(parts[:depth])
            allowed = ", ".join(sorted(types_))
            raise ConfigError(
                f"unknown config key {key} ({part!r} is not a field of "
                f"{prefix or 'the top level'}; allowed: {allowed})"
            )
        tp = types_[part]
        last = depth == len(parts) - 1
        if _is_section(tp):
            if last:
                raise ConfigError(f"{key}: is a section; set one of its fields, e.g. {key}.<field>")
            node = node.setdefault(part, {})
            cls = tp
            continue
        if typing.get_origin(tp) is dict or tp is dict:
            # Free-form tables (model.spec): the rest of the path is the entry's key.
            if last:
                node[part] = coerce(key, value, tp, text=True)
            else:
                entry = ".".join(parts[depth + 1 :])
                node.setdefault(part, {})[entry] = _table_value(key, entry, value)
            return
        if not last:
            raise ConfigError(
                f"unknown config key {key}: {'.'.join(parts[: depth + 1])} is a value"
            )
        node[part] = coerce(key, value, tp, text=True)
        return


def _table_value(key: str, entry: str, value: Any) -> Any:
    """A model.spec entry: typed by the ModelSpec field of that name, else read as a literal."""
    from resnext.models import ModelSpec

    hints = typing.get_type_hints(ModelSpec)
    if isinstance(value, str) and entry in hints:
        return coerce(key, value, hints[entry], text=True)
    return _literal(value)


def _literal(text: Any) -> Any:
    """A free-form table entry given as text: int, float, bool, list or else the string itself."""
    if not isinstance(text, str):
        return text
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
