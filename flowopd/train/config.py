"""Recipe configs: a TOML file is an instance of a config dataclass, refined by ``key=value`` overrides.

``load_config(PretrainConfig, "training/configs/mini_pretrain.toml", ["max_steps=20", "model.channels=[16,32,64]"])``
reads the file, applies the overrides (dotted keys reach nested dataclasses; values are parsed as TOML values,
falling back to a plain string) and converts every value to the field's declared type. Unknown keys are errors
that name the file or override and the closest known keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from the TOML file at ``path`` (optional) and ``key=value`` overrides (applied last)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} not found") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from e
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(data, key.strip(), _Override(raw.strip()))
    return from_dict(cls, data, source)


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "config", prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (nested) mapping, converting values to the declared field types."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=3)
        hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
        raise ConfigError(
            f"{source}: unknown key {prefix + key!r} for {cls.__name__}{hint} "
            f"(known keys: {', '.join(prefix + f for f in fields)})"
        )
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}", source) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for logging into a run directory and checking a resume)."""
    return dataclasses.asdict(config)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    data[leaf] = value


class _Override(str):
    """The raw text of a command-line value; parsed once its field's type is known."""


def _parse_value(raw: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"s"``) or, failing that, the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return str(raw)


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Override):
        if value.lower() == "none" and type(None) in args:
            return None
        parsed = _parse_value(value)
        # a string field keeps the text as typed (``name=true`` is "true"), unless it was TOML-quoted
        value = parsed if isinstance(parsed, str) or not _accepts_str(tp) else str(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key!r} must be a table of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key!r} must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key!r} must be a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key!r} must be true or false, got {value!r}")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key!r} must be a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{source}: {key!r} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _accepts_str(tp: Any) -> bool:
    return tp is str or str in typing.get_args(tp)
