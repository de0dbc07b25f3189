"""Typed JSON sections: dataclasses whose fields are checked against their own annotations.

The manifest is read from a bundle, so it is untrusted input (any bundle file is validated
before use), and a config that names a field wrongly should say so instead of failing later
with a KeyError (nanoGPT's configurator, PEFT's config checks). Each manifest section is a
small dataclass; `from_json` builds one from a JSON object, refusing unknown and missing keys,
and `conform`, called from `__post_init__`, checks every field's type (nested sections,
lists and dicts included) and turns nested JSON objects into their dataclasses. Messages name
the field by its path (`manifest.trainable[3].shape[1]`) and say what is accepted.

Types understood: str, int, float (an int is accepted and kept as it is, so a value written as
`0` is written back as `0`), bool, bare dict (free-form JSON), list[X], dict[str, X], X | None
and dataclasses. bool is never accepted as a number. Standard library only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, cast

T = TypeVar("T")
ErrorType = type[Exception]


def from_json(cls: type[T], data: object, where: str, error: ErrorType) -> T:
    """Build dataclass `cls` from a JSON object (or pass an instance through).

    Args:
        cls: the section's dataclass; its `__post_init__` is expected to call `conform`.
        data: the parsed JSON value.
        where: the field path for messages, e.g. "manifest.adapter".
        error: the exception type to raise (a ValueError subclass naming the input's kind).

    Raises:
        error: `data` is not an object, or has keys `cls` does not have, or lacks required ones.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise error(f"{where} must be a JSON object, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls))}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise error(f"{where} has unknown keys {unknown}; accepted: {sorted(fields)}")
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise error(f"{where} lacks keys {missing}")
    hints = _hints(cls)  # checked here too, so that messages carry the whole path
    return cls(**{name: _conform(value, hints[name], f"{where}.{name}", error) for name, value in data.items()})


def conform(section: object, where: str, error: ErrorType) -> None:
    """Check every field of dataclass instance `section` against its annotation, in place.

    Nested JSON objects become their dataclasses; lists and dicts are copied. Works on frozen
    dataclasses too (it is meant for `__post_init__`).

    Raises:
        error: naming the first field whose value does not fit, and the type accepted.
    """
    hints = _hints(type(section))
    for f in dataclasses.fields(cast(Any, section)):
        value = _conform(getattr(section, f.name), hints[f.name], f"{where}.{f.name}", error)
        object.__setattr__(section, f.name, value)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached: sections are checked on every read)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _conform(value: object, hint: Any, where: str, error: ErrorType) -> object:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]  # X | None is the only union sections use
        return _conform(value, hint, where, error)
    if dataclasses.is_dataclass(hint):
        return from_json(cast(Any, hint), value, where, error)
    if origin is list:
        _expect(isinstance(value, list), value, "a list", where, error)
        return [_conform(item, args[0], f"{where}[{i}]", error) for i, item in enumerate(cast(list, value))]
    if origin is dict:
        _expect(isinstance(value, dict) and all(isinstance(k, str) for k in value), value,
                "an object", where, error)
        return {k: _conform(item, args[1], f"{where}[{k!r}]", error) for k, item in cast(dict, value).items()}
    _expect(_is_scalar(value, hint), value, _name(hint), where, error)
    return value


def _is_scalar(value: object, hint: type) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _expect(ok: bool, value: object, accepted: str, where: str, error: ErrorType) -> None:
    if not ok:
        raise error(f"{where} must be {accepted}, got {_show(value)}")


def _name(hint: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            dict: "an object"}.get(hint, hint.__name__)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
