"""Value constraints declared beside each config section, and the one checker that walks them.

A section lists ``constraints`` (field -> constraint, scikit-learn's ``_parameter_constraints`` in small) and
``checks`` (named functions for rules that relate several fields); ``check_section`` applies both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal, Protocol

from dogbench.errors import DogbenchError


class ConfigError(DogbenchError, ValueError):
    """A config file or override that cannot be understood; the message names the key and the valid choices."""


class Constraint(Protocol):
    def violation(self, key: str, value: Any, *, element: bool = False) -> str | None:
        """The error message when ``value`` (of ``key``, or one element of it) breaks the constraint, else None."""


def choice_error(key: str, value: Any, choices: Iterable[str], *, element: bool = False) -> str:
    """``Unknown tune.pruner 'asha'. Valid pruners: ...``, or for a list's element
    ``Unknown head 'svm' in tune.heads. Valid heads: ...``."""
    name = key.rpartition(".")[2]
    valid = ", ".join(choices)
    if element:
        return f"Unknown {name.removesuffix('s')} '{value}' in {key}. Valid {name}: {valid}"
    return f"Unknown {key} '{value}'. Valid {name}s: {valid}"


@dataclass(frozen=True)
class Interval:
    """A number within bounds (``None``: unbounded on that side); an unset optional field (None) passes."""

    low: float | None = None
    high: float | None = None
    closed: Literal["both", "left", "right", "neither"] = "both"
    hint: str = ""  # said after the bounds, e.g. "omit it: auto"

    def describe(self) -> str:
        low_in, high_in = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.high is None:
            return f"{'>=' if low_in else '>'} {self.low}"
        if self.low is None:
            return f"{'<=' if high_in else '<'} {self.high}"
        return f"in {'[' if low_in else '('}{self.low}, {self.high}{']' if high_in else ')'}"

    def holds(self, value: float) -> bool:
        low_in, high_in = self.closed in ("both", "left"), self.closed in ("both", "right")
        above = self.low is None or (value >= self.low if low_in else value > self.low)
        below = self.high is None or (value <= self.high if high_in else value < self.high)
        return above and below

    def violation(self, key: str, value: Any, *, element: bool = False) -> str | None:
        if value is None or self.holds(value):
            return None
        hint = f" ({self.hint})" if self.hint else ""
        return f"{key}{' values' if element else ''} must be {self.describe()}{hint}, got {value!r}"


@dataclass(frozen=True)
class OneOf:
    """A string among an Enum's values (for fields kept as plain strings)."""

    choices: type[StrEnum]

    def violation(self, key: str, value: Any, *, element: bool = False) -> str | None:
        valid = [c.value for c in self.choices]
        return None if value in valid else choice_error(key, value, valid, element=element)


@dataclass(frozen=True)
class Matches:
    """A string matching a pattern in full; ``what`` and ``valid`` word the error."""

    pattern: re.Pattern[str]
    what: str
    valid: str

    def violation(self, key: str, value: Any, *, element: bool = False) -> str | None:
        if self.pattern.fullmatch(value):
            return None
        return f"{key} '{value}' is not {self.what}. Valid: {self.valid}"


@dataclass(frozen=True)
class Each:
    """Every element of a list field meets ``inner``."""

    inner: Constraint

    def violation(self, key: str, value: Any, *, element: bool = False) -> str | None:
        return next((m for v in value if (m := self.inner.violation(key, v, element=True))), None)


@dataclass(frozen=True)
class NonEmpty:
    """A list field with at least one element; the error lists the valid choices."""

    choices: type[StrEnum]

    def violation(self, key: str, value: Any, *, element: bool = False) -> str | None:
        if value:
            return None
        return f"{key} is empty. Valid {key.rpartition('.')[2]}: {', '.join(c.value for c in self.choices)}"


Parser = Callable[[str, Any], Any]  # (key, value as written) -> the value the field's type check sees


class Section:
    """Base of a config section: its declared constraints, cross-field checks and command-line shorthands."""

    constraints: ClassVar[Mapping[str, Constraint]] = {}
    checks: ClassVar[tuple[Callable[[Any], None], ...]] = ()
    parsers: ClassVar[Mapping[str, Parser]] = {}


def check_section(section: Section, name: str) -> None:
    """Every declared constraint of ``section`` (the ``[name]`` table), then its checks; ConfigError at the first."""
    for key, constraint in type(section).constraints.items():
        message = constraint.violation(f"{name}.{key}", getattr(section, key))
        if message:
            raise ConfigError(message)
    for check in type(section).checks:
        check(section)
