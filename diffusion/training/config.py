"""Typed dataclass configs from short YAML files plus type-checked command-line overrides.

    cfg = parse_config(TrainConfig)          # --config a.yaml [--config b.yaml] --lr=1e-4 --steps 100
                                             # --dry-run prints the resolved YAML; --help lists fields

Precedence: dataclass defaults < YAML files (in order; a file may name `_base_: other.yaml`)
< command-line overrides. Nested dataclass fields are addressed with dotted keys (--optim.lr).
Supported field types: bool, int, float, str, Path, Optional[X], Literal[...], tuple[X, ...],
tuple[X, Y], list[X], dict, Any, nested dataclasses; field(metadata={"help": ..., "choices": [...]}).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from .coercion import _FALSE, _NONE, _TRUE, ConfigError, coerce, type_name

__all__ = ["ConfigError", "parse_config", "from_dict", "to_dict", "to_yaml", "save_yaml", "load_yaml",
           "load_config", "config_fields", "field_help", "to_json", "coerce", "type_name"]


def option(help: str, **kw) -> dataclasses.Field:
    """A dataclass field with its --help text (`default=` / `default_factory=` as for dataclasses.field)."""
    return dataclasses.field(metadata={"help": help}, **kw)


# ----------------------------------------------------------------------------------------------- schema
def config_fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Flattened schema: dotted key -> (field, resolved type) for every leaf of a (nested) dataclass."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in config_fields(tp).items()})
        else:
            out[f.name] = (f, tp)
    return out


def _prefixes(cls) -> set[str]:
    """Dotted keys of the nested-dataclass fields (which take a mapping, not a value)."""
    return {k.rsplit(".", i)[0] for k in config_fields(cls) for i in range(1, k.count(".") + 1)}


def _check_choices(key, f, value, source):
    choices = f.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        where = f" (from {source})" if source else ""
        raise ConfigError(f"config key {key!r}{where}: {value!r} is not a valid choice; valid: {list(choices)}")


def _unknown(key, valid, source, renamed: dict):
    where = f" (from {source})" if source else ""
    if key in renamed:  # a name the class used before (cls.RENAMED: old -> new)
        return ConfigError(f"config key {key!r}{where} was renamed to diffusers' name: did you mean "
                           f"--{renamed[key].replace(' and ', ' and --')}?")
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint} Valid keys: {', '.join(sorted(valid))}")


# ----------------------------------------------------------------------------------------------- building
def _flatten(tree: dict, prefixes: set, prefix: str = "") -> dict:
    """Nested YAML mappings -> dotted keys, descending only into nested-dataclass fields."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{str(k).replace('-', '_')}"
        if key in prefixes and isinstance(v, dict):
            out.update(_flatten(v, prefixes, key + "."))
        else:
            out[key] = v
    return out


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {key!r} ({type_name(hints[f.name])}); "
                              f"set it in a --config file or as --{key}=...")
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ validation
        raise ConfigError(str(e)) from None


def from_dict(cls, data: dict, source: str | None = None, strict: bool = True):
    """Build a config from a (nested or dotted) mapping, coercing and checking every value."""
    schema = config_fields(cls)
    values = {}
    for key, raw in _flatten(data or {}, _prefixes(cls)).items():
        if key in schema or strict:
            values[key] = _checked(schema, cls, key, raw, source)
    return _build(cls, values)


def _checked(schema, cls, key, raw, source):
    if key not in schema:
        if key in _prefixes(cls):
            raise ConfigError(f"config key {key!r} is a section: set its fields (e.g. --{key}.<field>=...)")
        raise _unknown(key, list(schema), source, getattr(cls, "RENAMED", {}))
    f, tp = schema[key]
    value = coerce(raw, tp, key, source)
    _check_choices(key, f, value, source)
    return value


def _plain(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists, paths as str): YAML/JSON serializable, from_dict round-trips."""
    return _plain(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_yaml(cfg, path) -> Path:
    """Write the resolved config as YAML atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
    return path


def load_yaml(path, _seen=None) -> dict:
    """Read a YAML config file; `_base_: other.yaml` (relative to the file) is loaded first and overridden."""
    path = Path(path)
    seen = set(_seen or ())
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself via _base_")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = {}
    for b in [base] if isinstance(base, str) else base:
        merged = _merge(merged, load_yaml(path.parent / b, seen | {path.resolve()}))
    return _merge(merged, data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path, strict: bool = True):
    """Config from a YAML file (e.g. the config.yaml a run wrote)."""
    return from_dict(cls, load_yaml(path), source=str(path), strict=strict)


# ----------------------------------------------------------------------------------------------- command line
def field_help(cls) -> str:
    """One line per key: --key TYPE (default: ...) help text."""
    lines = []
    for key, (f, tp) in config_fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        extra = f" [choices: {', '.join(map(str, choices))}]" if choices else ""
        lines.append(f"  --{key} {type_name(tp)}  (default: {_plain(default)!r})\n      {text}{extra}".rstrip())
    return "\n".join(lines)


def _split_argv(argv: list[str], schema: dict):
    files, overrides, flags = [], [], set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            flags.add("help")
        elif arg in ("--dry-run", "--dry_run"):
            flags.add("dry_run")
        elif not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value or --key value "
                              f"(and --config FILE.yaml for config files)")
        else:
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                is_bool = key in schema and schema[key][1] in (bool, typing.Optional[bool])
                if nxt is None or (nxt.startswith("--") and not _is_number(nxt)):
                    if not is_bool and key != "config":
                        raise ConfigError(f"missing value for --{key} (use --{key}=VALUE)")
                    value = "true"
                elif is_bool and nxt.lower() not in _TRUE | _FALSE | _NONE:
                    value = "true"
                else:
                    value, i = nxt, i + 1
            if key == "config":
                files.append(value)
            else:
                overrides.append((key, value))
        i += 1
    return files, overrides, flags


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_config(cls, argv=None, *, prog: str | None = None, description: str | None = None,
                 exit_on_error: bool = True):
    """Resolve a config: defaults < --config YAML files < --key=value overrides.

    --dry-run prints the resolved config as YAML and exits; --help lists every key with its type,
    default and help text. Errors raise ConfigError (exit_on_error=True: printed, exit status 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or Path(sys.argv[0]).name
    schema = config_fields(cls)
    try:
        files, overrides, flags = _split_argv(argv, schema)
        if "help" in flags:
            doc = description or (cls.__doc__ or "").strip()
            doc = "" if doc.startswith(cls.__name__ + "(") else doc  # dataclass's generated signature
            print(f"usage: {prog} [--config FILE.yaml ...] [--key=value | --key value ...] [--dry-run]\n\n{doc}\n\n"
                  f"keys:\n{field_help(cls)}")
            raise SystemExit(0)
        data: dict = {}
        for path in files:
            data = _merge(data, load_yaml(path))
        values = {}
        source = ", ".join(files) or None
        for key, raw in _flatten(data, _prefixes(cls)).items():
            values[key] = _checked(schema, cls, key, raw, source)
        for key, raw in overrides:
            values[key] = _checked(schema, cls, key, raw, "command line")
        cfg = _build(cls, values)
    except ConfigError as e:
        if not exit_on_error:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if "dry_run" in flags:
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def to_json(cfg) -> str:
    """Compact JSON of the resolved config (for safetensors metadata, which holds str -> str)."""
    return json.dumps(to_dict(cfg), sort_keys=False)
