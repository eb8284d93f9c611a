"""The method registry: ``register_method``, ``create_method``, ``list_methods``.

Built-in methods are registered lazily as ``"module:Class"`` entries so that listing names
imports nothing heavy; third-party methods register through the entry-point group
``ppt_bench.methods`` (``name = "package.module:Class"``), also loaded on first use.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

from ppt_bench.errors import MethodError

if TYPE_CHECKING:
    from ppt_bench.methods.base import Method

ENTRY_POINT_GROUP = "ppt_bench.methods"

# name -> "module:Class" (not yet imported) or the class itself.
_BUILTIN: dict[str, str] = {
    "baseline": "ppt_bench.methods.baseline:Baseline",
    "ppt": "ppt_bench.methods.ppt:PPT",
    "prune": "ppt_bench.methods.prune:Prune",
    "merge": "ppt_bench.methods.merge:Merge",
    "tome": "ppt_bench.methods.tome:ToMe",
    "evit": "ppt_bench.methods.evit:EViT",
    "topk": "ppt_bench.methods.controls:TopK",
    "random": "ppt_bench.methods.controls:RandomDrop",
    "mctf": "ppt_bench.methods.mctf:MCTF",
    "dct": "ppt_bench.methods.dct:DCT",
    "pitome": "ppt_bench.methods.pitome:PiToMe",
    "tofu": "ppt_bench.methods.tofu:ToFu",
    "diffrate": "ppt_bench.methods.diffrate:DiffRate",
    "gtp": "ppt_bench.methods.gtp:GTP",
}
_REGISTRY: dict[str, str | type[Method]] = dict(_BUILTIN)
_ENTRY_POINTS_LOADED = False

M = TypeVar("M", bound="type[Method]")


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`~ppt_bench.methods.base.Method` under ``name``.

    Registering a second, different class under a taken name is an error.
    """

    def decorator(cls: M) -> M:
        current = _REGISTRY.get(name)
        lazy_self = isinstance(current, str) and current == f"{cls.__module__}:{cls.__qualname__}"
        if current is not None and current is not cls and not lazy_self:
            raise MethodError(f"method {name!r} is already registered ({_describe(current)})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _describe(entry: str | type) -> str:
    return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY and _describe(_REGISTRY[ep.name]) != ep.value:
            raise MethodError(
                f"entry point {ep.value!r} wants method name {ep.name!r}, "
                f"already registered by {_describe(_REGISTRY[ep.name])}"
            )
        _REGISTRY.setdefault(ep.name, ep.value)


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style ``pattern``, sorted."""
    _load_entry_points()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_method_class(name: str) -> type[Method]:
    """The class registered under ``name``, importing it on first use."""
    _load_entry_points()
    entry = _REGISTRY.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise MethodError(
            f"unknown method {name!r}.{hint} Valid methods: {', '.join(list_methods())}"
        )
    if isinstance(entry, str):
        module, _, qualname = entry.partition(":")
        cls = getattr(importlib.import_module(module), qualname)
        if _REGISTRY[name] is not cls:  # the module did not register itself under this name
            cls.name = name
            _REGISTRY[name] = cls
        return cls
    return entry


def method_params(name: str) -> dict[str, Any]:
    """Parameter names of a method with their defaults."""
    cls = get_method_class(name)
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
    }


def create_method(name: str, **params: Any) -> Method:
    """Build a method from its registry name and parameters.

    Raises:
        MethodError: unknown name, unknown parameter or invalid value; the message names the
            valid choices or range.
    """
    cls = get_method_class(name)
    valid = method_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        choices = ", ".join(valid) or "none"
        raise MethodError(
            f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {choices}"
        )
    try:
        return cls(**params)
    except MethodError as err:
        raise MethodError(f"{name}: {err}") from None
