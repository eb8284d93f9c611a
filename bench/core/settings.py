"""How a setting of ``ppt-bench run`` is declared: once, where it lives.

A per-run setting is a field of :class:`~ppt_bench.results.spec.RunSpec` declared with
:func:`setting`; a per-sweep one is a :class:`Setting` of the sweep configuration
(:data:`ppt_bench.sweeps.config.SWEEP_SETTINGS`). From that one declaration come the config-file
key, the command-line flag, the type check, the line of ``--print-config``, and whether the setting
enters a run's id and the key of the unreduced model's outputs. Nothing else lists settings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

# An example not given: ``--print-config`` shows the default.
_DEFAULT = object()

# What a per-run setting is to a run's identity.
RUN = "run"  # part of what a run measures: in its run_id
REFERENCE = "reference"  # also decides the unreduced model's outputs on the run's images
SCHEDULE = "schedule"  # how a run is scheduled or named, not what it measures: in neither


@dataclass(frozen=True)
class Setting:
    """One setting of a sweep.

    Args:
        key: the config-file key (``batch_sizes``); the flag is ``--`` + the key with dashes,
            or ``flag``.
        kind: the type of one value (``int``, ``str``, ``bool``); bool settings get
            ``--key`` / ``--no-key`` flags.
        default: the value when neither the file nor a flag gives one.
        help: one line for ``--help`` and ``--print-config``.
        example: the value ``--print-config`` shows (default: the default); None comments the
            line out.
        axis: a sweep axis: a list of values in the file, a repeatable flag, one run per value.
        many: a list within one run (``metrics``): a repeatable flag of comma-separated values.
        identity: :data:`RUN`, :data:`REFERENCE` or :data:`SCHEDULE` (per-run settings only).
        field: the :class:`~ppt_bench.results.spec.RunSpec` field it sets, if it is per-run.
        flag: the flag, when it is not ``--`` + the key.
        choices: the valid values, checked by the flag's parser.
        metavar: the flag's value in ``--help``.
        cli: other ``argparse`` keywords of the flag (``nargs``, ``const``).
    """

    key: str
    kind: type
    default: Any
    help: str
    example: Any = _DEFAULT
    axis: bool = False
    many: bool = False
    identity: str = RUN
    field: str | None = None
    flag: str | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    cli: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    @property
    def start(self) -> Any:
        """The value before the file and the flags: a list for an axis or a list setting."""
        if self.axis:
            return [] if self.default is None else [self.default]
        return list(self.default) if self.many else self.default

    @property
    def shown(self) -> Any:
        """The value ``--print-config`` shows."""
        return self.start if self.example is _DEFAULT else self.example


def setting(default: Any, help: str, **declared: Any) -> Any:
    """A :class:`~ppt_bench.results.spec.RunSpec` field that is a setting of ``ppt-bench run``.

    The type of one value is the field's annotation, less ``None`` and the sequence around it
    (``int | None`` -> ``int``, ``tuple[str, ...]`` -> ``str``).

    Args:
        default: the field's default (a list default is given as a tuple).
        help: one line for ``--help`` and ``--print-config``.
        declared: the other :class:`Setting` arguments; ``key`` defaults to the field's name.
    """
    return field(default=default, metadata={"setting": (help, declared)})


def _kind(annotation: Any) -> type:
    """The type of one value of a field annotated ``annotation`` (a type, not its text): the
    type itself, less ``None`` (``int | None`` -> ``int``) and less the sequence around it
    (``tuple[str, ...]`` -> ``str``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _kind(rest[0])
    elif args and (origin, args[1:]) in ((tuple, (Ellipsis,)), (list, ())):
        return _kind(args[0])  # of tuple[T, ...] or list[T]
    elif origin is None and isinstance(annotation, type):
        return annotation
    raise TypeError(f"a setting holds one type, an optional one or a sequence of one: {annotation}")


def settings_of(cls: type) -> list[Setting]:
    """The settings a dataclass declares with :func:`setting`, in field order."""
    hints = typing.get_type_hints(cls)  # the annotations as types, whatever their spelling
    out = []
    for f in dataclasses.fields(cls):
        if "setting" not in f.metadata:
            continue
        help, declared = f.metadata["setting"]
        kind = _kind(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        default = list(default) if isinstance(default, tuple) else default
        declared = {"key": f.name, **declared}
        out.append(Setting(kind=kind, default=default, help=help, field=f.name, **declared))
    return out
