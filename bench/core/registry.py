"""``Registry``: named plugins of one kind (methods, metric groups, runners), one type for all.

An entry is the plugin itself or a ``"module:attr"`` string imported on first use, so that
listing names imports nothing heavy. Third-party plugins come from an entry-point group, read
on first use too. Registering a second, different plugin under a taken name is an error, and an
unknown name gets a "did you mean" and the valid choices.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from ppt_bench.core.errors import ArgumentError, UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Plugins of one kind by name, in the order they were registered.

    Args:
        kind: what the plugins are, for messages (``"method"``).
        group: the entry-point group third-party packages register under.
        builtin: name -> ``"module:attr"`` of the built-in plugins, imported on first use.
        error: the exception type of a user's mistake (unknown or duplicate name).
        on_load: called with the name and the plugin the first time a lazy entry is imported
            (the method registry names the class there).
    """

    def __init__(
        self,
        kind: str,
        group: str,
        builtin: dict[str, str] | None = None,
        *,
        error: type[UserError] = UserError,
        on_load: Callable[[str, T], None] | None = None,
    ) -> None:
        self.kind, self.group, self.error, self.on_load = kind, group, error, on_load
        self.builtin = dict(builtin or {})
        self._entries: dict[str, str | T] = dict(self.builtin)
        self._from_entry_points: set[str] = set()
        self._entry_points_loaded = False

    def fresh(self) -> Registry[T]:
        """A copy without the plugins of entry points, which it reads again on first use."""
        copy: Registry[T] = Registry(
            self.kind, self.group, self.builtin, error=self.error, on_load=self.on_load
        )
        copy._entries = {k: v for k, v in self._entries.items() if k not in self._from_entry_points}
        return copy

    def register(self, name: str, plugin: T) -> T:
        """Add ``plugin`` under ``name``; the same plugin again (or its lazy entry) is fine."""
        current = self._entries.get(name)
        if current is not None and current is not plugin and current != describe(plugin):
            raise self.error(f"{self.kind} {name!r} is already registered ({describe(current)})")
        self._entries[name] = plugin
        return plugin

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            current = self._entries.get(ep.name)
            if current is not None and describe(current) != ep.value:
                raise self.error(
                    f"entry point {ep.value!r} wants {self.kind} name {ep.name!r}, "
                    f"already registered by {describe(current)}"
                )
            if current is None:
                self._entries[ep.name] = ep.value
                self._from_entry_points.add(ep.name)

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, in registration order."""
        self._load_entry_points()
        if pattern == "*":
            return list(self._entries)
        return [n for n in self._entries if fnmatch.fnmatch(n, pattern)]

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The plugin called ``name``, imported on first use.

        Raises:
            UserError: (of the registry's ``error`` type) an unknown name, with the closest
                name and every valid one.
            ArgumentError: ``name`` is not a string.
        """
        self._load_entry_points()
        if not isinstance(name, str):
            first = next(iter(self._entries), "")
            raise ArgumentError(
                f"a {self.kind} name must be a str such as {first!r}, got {name!r} "
                f"({type(name).__name__})"
            )
        entry = self._entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(sorted(self._entries))
            raise self.error(f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {valid}")
        if not isinstance(entry, str):
            return entry
        module, _, attr = entry.partition(":")
        plugin = getattr(importlib.import_module(module), attr)
        if self._entries.get(name) is not plugin:  # the module did not register it itself
            self._entries[name] = plugin
            if self.on_load is not None:
                self.on_load(name, plugin)
        return plugin


def describe(entry: object) -> str:
    """``"module:attr"`` of a plugin, or the lazy entry itself."""
    if isinstance(entry, str):
        return entry
    qualname = getattr(entry, "__qualname__", None)
    return f"{entry.__module__}:{qualname}" if qualname else repr(entry)
