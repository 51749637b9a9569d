"""TOML values -> typed section fields: known keys, command-line shorthands, type checks, Enums and tuples.

The field's type hint drives it: a bool is not an int, an int is a valid float, a string for an Enum field
becomes its member (or an error listing the members), a list for a tuple field becomes a tuple.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from dogbench.config.constraints import ConfigError, Section, choice_error


def unknown_key(section: str, key: str, valid: Sequence[str]) -> ConfigError:
    """An unknown key, with the closest valid one suggested and every valid one listed."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"Unknown key '{key}' in [{section}].{hint} Valid keys: {', '.join(valid)}")


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Enum)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def accepts(hint: Any, value: Any) -> bool:
    """Whether a TOML value fits a field's type hint (bool is not an int here; an int is a valid float). Any value
    fits an Enum field: ``to_enum`` then names the valid members."""
    origin = typing.get_origin(hint)
    if _is_union(hint):
        return any(accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, list | tuple)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if _is_enum(hint):
        return True
    if hint is str:
        return isinstance(value, str)
    if origin is Mapping or hint is Mapping:
        return isinstance(value, Mapping)
    return True


def type_name(hint: Any) -> str:
    """A type hint as a user writes it in TOML terms: ``int | None``, ``tuple[str, ...]`` (an Enum is a str)."""
    if _is_enum(hint) or hint is str:
        return "str"
    if hint is type(None):
        return "None"
    if _is_union(hint):
        return " | ".join(type_name(arg) for arg in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is not None:
        args = ", ".join("..." if arg is Ellipsis else type_name(arg) for arg in typing.get_args(hint))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def check_types(cls: type, section: str, values: Mapping[str, Any]) -> None:
    """ConfigError naming ``section.key`` and the expected type for the first value that does not fit."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not accepts(hints[key], value):
            raise ConfigError(f"{section}.{key} must be of type {type_name(hints[key])}, got {value!r}")


def to_enum(enum: type[Enum], key: str, value: Any, *, element: bool = False) -> Any:
    """The member whose value is ``value``; ConfigError listing the members otherwise."""
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(choice_error(key, value, [m.value for m in enum], element=element)) from None


def numbers(key: str, values: Any) -> tuple[float, ...]:
    """A list of plain numbers (not booleans, strings or lists) as floats; ConfigError naming ``key`` otherwise."""
    if not isinstance(values, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{key} must be a list of numbers, e.g. [0.25, 0.5], got {values!r}")
    return tuple(float(v) for v in values)


def convert(hint: Any, key: str, value: Any) -> Any:
    """A type-checked value in the field's own type: Enum members, tuples of members, floats or strings."""
    if value is None:
        return None
    if _is_union(hint):
        return convert(next(arg for arg in typing.get_args(hint) if accepts(arg, value)), key, value)
    if _is_enum(hint):
        return to_enum(hint, key, value)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if _is_enum(item):
            return tuple(to_enum(item, key, v, element=True) for v in value)
        if item is float:
            return numbers(key, value)
        if item is str:
            return tuple(str(v) for v in value)
        return tuple(value)
    return value


def coerce_section(cls: type[Section], section: str, values: Mapping[str, Any]) -> Any:
    """A ``[section]`` table -> ``cls``: unknown keys refused, shorthands parsed, types checked and converted."""
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in valid:
            raise unknown_key(section, key, valid)
    values = {key: cls.parsers[key](f"{section}.{key}", v) if key in cls.parsers else v for key, v in values.items()}
    check_types(cls, section, values)
    hints = typing.get_type_hints(cls)
    return cls(**{key: convert(hints[key], f"{section}.{key}", v) for key, v in values.items()})


# Command-line shorthands (``--set section.key=...``): a plain string standing for a list.

def one_item(key: str, value: Any) -> Any:
    """``"x"`` -> ``["x"]`` (no splitting: the item may contain commas, like a path)."""
    return [value] if isinstance(value, str) else value


def comma_list(key: str, value: Any) -> Any:
    """``"lora, full"`` -> ``["lora", "full"]``."""
    return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


def comma_numbers(key: str, value: Any) -> Any:
    """``"0.5,0.75"`` or a single number -> ``[0.5, 0.75]``; ConfigError for words."""
    if not isinstance(value, str | int | float):
        return value
    try:
        return [float(item) for item in str(value).split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"{key} must be numbers, e.g. 0.25,0.5,0.75, got {value!r}") from None


def count_or_names(key: str, value: Any) -> Any:
    """``"20"`` -> 20, ``"pug, akita"`` -> ``["pug", "akita"]``."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    return int(text) if text.isdigit() else comma_list(key, text)
