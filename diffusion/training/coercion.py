"""Type coercion of config values: a YAML value or command-line string -> the dataclass field's type, or a
ConfigError naming the key, where the value came from, the expected type and the value."""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

_NONE = {"none", "null", "~"}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key and the fix."""


def type_name(tp) -> str:
    """Readable type for help and errors: 'int | None', '{a,b}', 'float,float', 'int,...'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{type_name(args[0])},..."
        return ",".join(type_name(a) for a in args)
    if origin is list:
        return f"{type_name(args[0]) if args else 'any'},..."
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(key, tp, value, source, extra=""):
    where = f" (from {source})" if source else ""
    raise ConfigError(f"config key {key!r}{where}: expected {type_name(tp)}, got {value!r}{extra}")


def _sequence(value, key, tp, source):
    if isinstance(value, str):
        s = value.strip()
        if s[:1] in "[(":
            value = yaml.safe_load("[" + s[1:-1] + "]") if s[-1:] in "])" else _fail(key, tp, value, source)
        else:
            value = [v.strip() for v in s.split(",")] if s else []
    if not isinstance(value, (list, tuple)):
        _fail(key, tp, value, source)
    return list(value)


def coerce(value, tp, key: str = "value", source: str | None = None):
    """Convert a YAML value or command-line string to type `tp`; ConfigError names key, type and value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
            _fail(key, tp, value, source)
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, source)
            except ConfigError:
                pass
        _fail(key, tp, value, source)
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and not isinstance(choice, str) and value == str(choice)):
                return choice
        _fail(key, tp, value, source, f"; valid choices: {list(args)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        _fail(key, tp, value, source, " (use true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        _fail(key, tp, value, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # also '1e-4', which YAML 1.1 reads as a string
            except ValueError:
                pass
        _fail(key, tp, value, source)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(key, tp, value, source, " (quote it in YAML)")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        _fail(key, tp, value, source)
    if origin is tuple:
        items = _sequence(value, key, tp, source)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(items))
        if args and len(items) != len(args):
            _fail(key, tp, value, source, f" ({len(args)} items needed, got {len(items)})")
        kinds = args or [Any] * len(items)
        return tuple(coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(items, kinds)))
    if origin is list:
        el = args[0] if args else Any
        return [coerce(v, el, f"{key}[{i}]", source) for i, v in enumerate(_sequence(value, key, tp, source))]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            _fail(key, tp, value, source)
        return dict(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key!r}: unsupported field type {tp!r}")
