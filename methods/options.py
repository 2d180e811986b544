"""A method's options, declared once: a dataclass field with its default, its help line and the values it accepts.

From these declarations the CLI builds one `--flag` per option name over every registered method (pkv_cli/common.py),
a policy checks the values it is given (`check_options`, run when it is constructed), and `--help` shows which
methods have an option and their defaults. A method never writes a CLI option or a range check by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pkv_core.errors import UserInputError

# What is wrong with a value, said after "--flag " (None: nothing is).
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class OptionSpec:
    help: str
    choices: tuple[str, ...] | None = None
    check: Check | None = None


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, check: Check | None = None) -> Any:
    """A method option: `kernel: int = option(7, "pooling width along keys", check=positive_odd)`."""
    return dataclasses.field(default=default, metadata={"pkv": OptionSpec(help, choices, check)})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be a positive integer"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be a non-negative integer"


def positive_odd(value: Any) -> str | None:
    return None if value >= 1 and value % 2 == 1 else "must be a positive odd number"


def positive_number(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A check for low <= value <= high, either end open: in_range(0, 1, high_open=True) is [0, 1)."""
    text = f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(value: Any) -> str | None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return None if above and below else text

    return check


def spec_of(field: dataclasses.Field) -> OptionSpec:
    return field.metadata.get("pkv") or OptionSpec(help=field.name.replace("_", " "))


def check_options(policy: Any) -> None:
    """Every option of `policy` has its declared type (a manifest or a caller may hand over a wrong one: say which)
    and passes its declared checks; raises UserInputError naming the option."""
    fields = dataclasses.fields(policy)
    for f in fields:
        value, want = getattr(policy, f.name), type(f.default)
        if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
            raise UserInputError(f"{flag(f.name)} must be {want.__name__} (got {value!r})")
    for f in fields:
        spec, value = spec_of(f), getattr(policy, f.name)
        if spec.choices is not None and value not in spec.choices:
            what = f.name.replace("_", " ")
            raise UserInputError(f"unknown {what} '{value}' (choose from {', '.join(spec.choices)})")
        problem = spec.check(value) if spec.check else None
        if problem:
            raise UserInputError(f"{flag(f.name)} {problem} (got {value})")


@dataclass
class CliOption:
    """One CLI option shared by every method that has a field of this name."""

    name: str
    type: type
    choices: tuple[str, ...] | None
    helps: dict[str, list[str]]  # help text -> the methods that use it
    defaults: dict[str, Any]  # method -> its default

    def help_text(self) -> str:
        """One line: the help (prefixed by its methods when they differ), then the defaults per method."""
        methods = [m for ms in self.helps.values() for m in ms]
        if len(self.helps) == 1:
            text = f"{', '.join(methods)}: {next(iter(self.helps))}."
        else:
            text = " ".join(f"{', '.join(ms)}: {h}." for h, ms in self.helps.items())
        values = list(dict.fromkeys(self.defaults.values()))
        if len(values) == 1:
            default = f"{values[0]}"
        else:
            common = max(values, key=lambda v: sum(d == v for d in self.defaults.values()))
            rest = [f"{m} {d}" for m, d in self.defaults.items() if d != common]
            default = f"{common}; {', '.join(rest)}"
        return f"{text} [{default}]"


def cli_options(methods: dict[str, type]) -> list[CliOption]:
    """The union of every method's options, in the order they first appear, for the CLI."""
    out: dict[str, CliOption] = {}
    for name, cls in methods.items():
        for f in dataclasses.fields(cls):
            spec = spec_of(f)
            opt = out.setdefault(f.name, CliOption(f.name, type(f.default), spec.choices, {}, {}))
            if opt.type is not type(f.default):
                raise TypeError(f"option {flag(f.name)} is {opt.type.__name__} in one method, "
                                f"{type(f.default).__name__} in {name}")
            opt.helps.setdefault(spec.help, []).append(name)
            opt.defaults[name] = f.default
            if spec.choices is not None:
                opt.choices = tuple(dict.fromkeys((opt.choices or ()) + spec.choices))
    return list(out.values())
