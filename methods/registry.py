"""The method registry: ``register_method``, ``create_method``, ``list_methods``.

Built-in methods are registered lazily as ``"module:Class"`` entries so that listing names
imports nothing heavy; third-party methods register through the entry-point group
``ppt_bench.methods`` (``name = "package.module:Class"``), also loaded on first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ppt_bench.core.errors import ArgumentError, MethodError
from ppt_bench.core.keyvalue import show_value
from ppt_bench.core.registry import Registry
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
    "atc": "ppt_bench.methods.atc:ATC",
    "gtp": "ppt_bench.methods.gtp:GTP",
}


def _name_class(name: str, cls: type[Method]) -> None:
    cls.name = name


METHODS: Registry[type[Method]] = Registry(
    "method", ENTRY_POINT_GROUP, _BUILTIN, error=MethodError, on_load=_name_class
)

M = TypeVar("M", bound="type[Method]")


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`~ppt_bench.methods.base.Method` under ``name``.

    Registering a second, different class under a taken name is an error.
    """

    def decorator(cls: M) -> M:
        METHODS.register(name, cls)
        cls.name = name
        return cls

    return decorator


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style ``pattern``, sorted."""
    return sorted(METHODS.names(pattern))


def registered_methods() -> list[str]:
    """Every registered method's name in the order of registration: the built-in table's, then
    the ``@register_method`` and entry-point ones."""
    return METHODS.names()


def get_method_class(name: str) -> type[Method]:
    """The class registered under ``name``, importing it on first use."""
    return METHODS.get(name)


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


def method_setting(method: Method) -> tuple[str, dict[str, Any]]:
    """The registry name of a method object and the parameters it holds apart from its class's
    defaults: ``create_method(name, **params)`` makes the same method (a sweep given the object
    runs it so).

    Raises:
        ArgumentError: ``method`` is not a method object of a registered class.
    """
    cls = type(method)
    if not isinstance(method, Method):
        raise ArgumentError(
            f"a method must be a registered name or a Method object, got {method!r} "
            f"({cls.__name__})"
        )
    if cls.name not in METHODS or get_method_class(cls.name) is not cls:
        raise ArgumentError(
            f"the method object {method!r} is of class {cls.__name__}, which is not registered: "
            "register it with @register_method(name), or pass a registered method's name"
        )
    defaults = create_method(cls.name).params()
    return cls.name, {k: v for k, v in method.params().items() if v != defaults[k]}


def methods_markdown(names: Iterable[str] | None = None) -> str:
    """The methods page (``docs/methods.md``) as the registry declares it: one table of the
    methods (family, what each does and where it is published, parameters with defaults),
    then each method's parameters with their help (``Method.parameter_help``). ``ppt-bench list
    --markdown`` prints it for every registered method; a test checks that the page holds it,
    for the built-in ones, unchanged.

    Args:
        names: the methods, in order; None: every registered one.
    """
    names = list_methods() if names is None else list(names)
    lines = [
        "| method | family | what it does | parameters (defaults) |",
        "|---|---|---|---|",
    ]
    for name in names:
        cls = get_method_class(name)
        params = ", ".join(f"`{k}={show_value(v)}`" for k, v in method_params(name).items()) or "-"
        lines.append(f"| `{name}` | {cls.family} | {_cell(cls.description)} | {params} |")
    for name in names:
        helps = get_method_class(name).parameter_help()
        if not helps:
            continue
        lines += ["", f"**`{name}`**", "", "| parameter | default | meaning |", "|---|---|---|"]
        defaults = method_params(name)
        lines += [
            f"| `{k}` | `{show_value(defaults[k])}` | {_cell(text)} |" for k, text in helps.items()
        ]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text inside a markdown table cell (a ``|`` would end the cell)."""
    return text.replace("|", "\\|")
