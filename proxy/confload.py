"""Turn TOML tables into typed dataclasses, naming the key on every error.

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``Literal``,
``X | None``, ``list[T]``, ``dict[str, T]``, ``Any`` and nested dataclasses
(also in lists).  Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from llm_warden.proxy.errors import ConfigError

T = TypeVar("T")
_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    h = _hints_cache.get(cls)
    if h is None:
        h = get_type_hints(cls)
        _hints_cache[cls] = h
    return h


def load_dataclass(cls: type[T], data: Any, key: str) -> T:
    """Validate ``data`` (a TOML table) into ``cls``; ``key`` is its dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(key, f"expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(_join(key, name), f"unknown key (known keys: {known})")
        kwargs[name] = convert(hints[name], value, _join(key, name))
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(key, name), "is missing, and has no default")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(key, str(e)) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(key)
    return obj


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(key, f"value {value!r} does not fit {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}")
        (item,) = get_args(tp) or (Any,)
        return [convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {type(value).__name__}")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): convert(vt, v, _join(key, str(k))) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return load_dataclass(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, typing.TypeVar):
        return value
    raise ConfigError(key, f"unsupported config type {tp}")
