"""A lazy registry: names map to ``"module:Class"`` strings imported on first use.

Third-party packages add entries through an entry-point group (``flowopd.scorers`` for scorers,
``flowopd.prompt_loaders`` for generated prompt sets). Benchmark specs name entries of these registries only:
a spec never imports a module by itself.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any


class UnknownNameError(KeyError):
    """A name that is not registered; the message suggests the closest names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def import_string(target: str) -> Any:
    """Import ``"package.module:Attr"`` and return the attribute."""
    module_name, sep, attr = target.partition(":")
    if not sep or not attr:
        raise ValueError(f"expected 'module:Attr', got {target!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ImportError(f"{module_name!r} has no attribute {attr!r} (from {target!r})") from e


class Registry:
    """Maps names to import strings; resolves them on first use."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._targets: dict[str, str] = {}
        self._loaded: dict[str, Any] = {}
        self._entry_points_read = False

    def register(self, name: str, target: str) -> None:
        if name in self._targets and self._targets[name] != target:
            raise ValueError(f"{self.kind} {name!r} is already registered as {self._targets[name]!r}")
        self._targets[name] = target

    def _read_entry_points(self) -> None:
        if self._entry_points_read or self.entry_point_group is None:
            return
        self._entry_points_read = True
        for ep in entry_points(group=self.entry_point_group):
            self._targets.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        self._read_entry_points()
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        self._read_entry_points()
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def target(self, name: str) -> str:
        self._read_entry_points()
        if name not in self._targets:
            raise self._unknown(name)
        return self._targets[name]

    def _unknown(self, name: str) -> UnknownNameError:
        close = difflib.get_close_matches(name, self._targets, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return UnknownNameError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})")

    def name_of(self, value: str) -> str:
        """The registered name that ``value`` stands for: a name, or a registered ``"module:Attr"`` target
        (specs written before the name existed); anything else raises UnknownNameError. Imports nothing, so a
        spec naming unregistered code is refused before any of it runs (issue 19, point 5)."""
        self._read_entry_points()
        if value in self._targets:
            return value
        for name, target in self._targets.items():
            if target == value:
                return name
        raise self._unknown(value)

    def get(self, name: str) -> Any:
        """The registered object (class or factory), imported on first use."""
        if name not in self._loaded:
            self._loaded[name] = import_string(self.target(name))
        return self._loaded[name]


#: Generated prompt sets (a benchmark spec's ``[prompts] format = "python"``, ``loader = NAME``): callables
#: ``loader(**args) -> list of metadata dicts`` that each carry ``"prompt"``.
PROMPT_LOADERS = Registry("prompt loader", entry_point_group="flowopd.prompt_loaders")
PROMPT_LOADERS.register("mini-world", "flowopd.world.grammar:prompt_set")
