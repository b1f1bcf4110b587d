"""The types of settings: each :class:`Kind` reads a value from command-line text and checks one
that arrives typed (TOML, JSON, Python), with one message that says what it wants.

Used by the settings table (:mod:`airgpu_nb.settings`); no I/O, nothing heavy imported.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import SpecError
from .spec import normalise_schedule, parse_gpus, validate_parameter, validate_schedule


class Invalid(ValueError):
    """A value a :class:`Kind` refuses; the message says what was wanted."""


def has_control_characters(text: str) -> bool:
    """Control, format and line/paragraph separator characters: none belongs in a setting."""
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


# -- kinds: one parser per type, used by every layer ---------------------------------------------

class Kind:
    """How one type of setting is read from text (the CLI, the panel) and checked when it
    arrives typed (TOML, JSON, Python)."""

    expect = "a value"

    def check(self, value: Any) -> Any:
        return value

    def from_text(self, text: str) -> Any:
        return self.check(text)

    def to_text(self, value: Any) -> list[str]:
        """The command-line words that give ``value`` back through :meth:`from_text`."""
        return [str(value)]

    def fail(self, value: Any) -> Invalid:
        return Invalid(f"expected {self.expect}, got {_show(value)}")


class Text(Kind):
    """A single-line string, optionally matching a pattern in full."""

    def __init__(self, expect: str = "a non-empty single-line string",
                 pattern: re.Pattern[str] | None = None, max_len: int = 1000,
                 extra: Callable[[str], Any] | None = None, numbers: bool = False) -> None:
        self.expect, self.pattern, self.max_len, self.extra = expect, pattern, max_len, extra
        self.numbers = numbers  # a quantity: TOML's `cpu = 2` means "2"

    def check(self, value: Any) -> Any:
        if self.numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if (not isinstance(value, str) or not value.strip() or len(value) > self.max_len
                or has_control_characters(value)
                or (self.pattern is not None and not self.pattern.fullmatch(value))):
            raise self.fail(value)
        if self.extra is not None:
            try:
                self.extra(value)
            except SpecError as exc:
                raise Invalid(str(exc)) from None
        return value


class Choice(Kind):
    def __init__(self, what: str, choices: Callable[[], Iterable[str]],
                 none_word: str | None = None) -> None:
        self.what, self.choices, self.none_word = what, choices, none_word

    @property
    def expect(self) -> str:  # type: ignore[override]
        return f"one of {', '.join(sorted(self.choices()))}"

    def check(self, value: Any) -> Any:
        if value is None and self.none_word is not None:
            return None
        if not isinstance(value, str) or value not in set(self.choices()):
            raise Invalid(str(SpecError.invalid_choice(self.what, value, self.choices())))
        return value

    def from_text(self, text: str) -> Any:
        if self.none_word is not None and text.strip().lower() == self.none_word:
            return None
        return self.check(text)


class Boolean(Kind):
    expect = "true or false"

    def check(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise self.fail(value)
        return value

    def from_text(self, text: str) -> Any:
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text.strip().lower() not in words:
            raise self.fail(text)
        return words[text.strip().lower()]


class Checked(Kind):
    """A string checked by one of the spec's validators (whose message is kept)."""

    def __init__(self, expect: str, validate: Callable[[Any], Any],
                 pattern: re.Pattern[str] | None = None) -> None:
        self.expect, self.validate, self.pattern = expect, validate, pattern

    def check(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise self.fail(value)
        try:
            self.validate(value)
        except SpecError as exc:
            raise Invalid(str(exc)) from None
        if has_control_characters(value):
            raise self.fail(value)
        return value


class Integer(Kind):
    def __init__(self, low: int, high: int, unit: str = "") -> None:
        self.low, self.high = low, high
        self.expect = f"a whole number{unit} from {low} to {high}"

    def check(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not (
                self.low <= value <= self.high):
            raise self.fail(value)
        return value

    def from_text(self, text: str) -> Any:
        try:
            value = int(text.strip())
        except ValueError:
            raise self.fail(text) from None
        return self.check(value)


class Gpus(Kind):
    expect = "a whole number of GPUs from 0 to 64, or 'all'"

    def check(self, value: Any) -> Any:
        if value == "all":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
            raise self.fail(value)
        return value

    def from_text(self, text: str) -> Any:
        try:
            return self.check(parse_gpus(text.strip()))
        except SpecError as exc:
            raise Invalid(str(exc)) from None


class Schedule(Kind):
    expect = "a 5-field cron expression, a preset such as @daily, or none"

    def check(self, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or has_control_characters(value):
            raise self.fail(value)
        try:
            return validate_schedule(normalise_schedule(value))
        except SpecError as exc:
            raise Invalid(str(exc)) from None

    def to_text(self, value: Any) -> list[str]:
        return ["none" if value is None else value]


class Date(Kind):
    expect = "a date as YYYY-MM-DD (invalid start date)"
    _RE = re.compile(r"\d{4}-\d{2}-\d{2}")

    def check(self, value: Any) -> Any:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value.isoformat()  # TOML's bare dates
        if not isinstance(value, str) or not self._RE.fullmatch(value):
            raise self.fail(value)
        try:
            day = dt.date.fromisoformat(value)
        except ValueError:
            raise self.fail(value) from None
        if day.year < 1970:
            raise self.fail(value)
        return value


class TextList(Kind):
    """A list of single-line strings; a repeated option on the command line."""

    def __init__(self, item: Text, expect: str = "a list of strings") -> None:
        self.item, self.expect = item, expect

    def check(self, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise self.fail(value)
        try:
            return [self.item.check(v) for v in value]
        except Invalid as exc:
            raise Invalid(f"{self.expect} ({exc})") from None

    def to_text(self, value: Any) -> list[str]:
        return list(value)


class Pairs(TextList):
    """KEY=VALUE items; a TOML/JSON table is accepted and kept as its items."""

    def __init__(self) -> None:
        super().__init__(Text("KEY=VALUE (--node-selector takes KEY=VALUE)",
                              pattern=re.compile(r"[^=]+=.*")), "a list of KEY=VALUE strings")

    def check(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            if not all(isinstance(v, str) for v in value.values()):
                raise self.fail(value)
            value = [f"{k}={v}" for k, v in value.items()]
        return super().check(value)


class Parameters(Kind):
    """The notebook's parameters: names are identifiers, values papermill literals."""

    expect = "a table of parameter names to strings, numbers, booleans or null"

    def check(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise self.fail(value)
        checked = {}
        for name, item in value.items():
            try:
                validate_parameter(name, item)
            except SpecError as exc:
                raise Invalid(str(exc)) from None
            checked[name] = item
        return checked

    def to_text(self, value: Any) -> list[str]:
        raise NotImplementedError  # -p/-r pairs: see regenerate_argv


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
