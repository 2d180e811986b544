"""The registered methods, and how a policy is built from options or rebuilt from a record.

Adding a method: write its module (see CONTRIBUTING.md) and add its module name to METHOD_MODULES; every command,
engine, report and the test matrix pick it up from here.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from methods.base import KVPolicy
from pkv_core.errors import UserInputError

# One line per method: the module under methods/ that defines it. The order is the CLI's.
METHOD_MODULES = ("full", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv", "kvzip", "pyramidinfer")

POLICIES: dict[str, type[KVPolicy]] = {}


def register(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Add a method (a KVPolicy subclass with its own `name`) to the registry; returns it."""
    if not cls.name or cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"a method needs a name of its own (got {cls.name!r})")
    POLICIES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    POLICIES.pop(name, None)


def _defined_in(module) -> type[KVPolicy]:
    """The method a module defines: its KVPolicy subclass whose `name` is the module's."""
    want = module.__name__.rsplit(".", 1)[-1]
    found = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, KVPolicy) and c.__module__ == module.__name__ and c.name == want]
    if len(found) != 1:
        raise ImportError(f"{module.__name__} must define one KVPolicy subclass named {want!r}")
    return found[0]


for _module in METHOD_MODULES:
    register(_defined_in(importlib.import_module(f"methods.{_module}")))


def options_of(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(POLICIES[name])]


def options_for(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The part of `options` that policy `name` has: for applying one set of settings to several methods
    (a sweep's window, a test's small budget) where an option one method lacks is meant to be skipped."""
    mine = set(options_of(name))
    return {k: v for k, v in options.items() if k in mine}


def make_policy(name: str, **options: Any) -> KVPolicy:
    """Build a registered policy. Options left as None take the policy's defaults; an option the policy does not
    have is refused (use `options_for` to apply shared settings to several methods)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UserInputError(f"unknown policy '{name}' (choose from {', '.join(POLICIES)})") from None
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - set(options_of(name)))
    if foreign:
        flags = ", ".join("--" + f.replace("_", "-") for f in foreign)
        have = ", ".join("--" + f.replace("_", "-") for f in options_of(name)) or "none"
        raise UserInputError(f"policy '{name}' has no option {flags} (its options: {have})")
    return cls(**given)


def check_policy_record(record: dict[str, Any]) -> KVPolicy:
    """A recorded policy (a manifest's `policy` block: name + every hyperparameter) rebuilt and validated."""
    name = record.get("name")
    if not isinstance(name, str) or name not in POLICIES:
        raise UserInputError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    fields = set(options_of(name))
    given = set(record) - {"name"}
    if given != fields:
        raise UserInputError(f"policy '{name}' has hyperparameters {sorted(fields)}, the record has {sorted(given)}")
    return make_policy(name, **{k: v for k, v in record.items() if k != "name"})
