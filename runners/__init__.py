"""Runners map ``evaluate(spec) -> records`` over a sweep: in-process or on Ray Tune.

This package's top level is the table of runners by name, which names each runner's class and
imports it only when that runner is built (:func:`create_runner`): the CLI reads the runners'
names and options from it without importing torch or Ray. ``LocalRunner``
(:mod:`ppt_bench.runners.local`) imports nothing beyond ppt-bench itself; ``RayRunner``
(:mod:`ppt_bench.runners.ray_tune`) needs ``ray[tune]`` (``pip install 'ppt-bench[ray]'``).
Third-party runners register a :class:`RunnerEntry` through the entry-point group
``ppt_bench.runners``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ppt_bench.core.errors import UserError
from ppt_bench.core.registry import Registry

if TYPE_CHECKING:
    from ppt_bench.runners.base import Runner

ENTRY_POINT_GROUP = "ppt_bench.runners"


@dataclass(frozen=True)
class RunnerEntry:
    """A runner in the table: where its class is, and the settings only it takes.

    Args:
        target: ``"module:Class"``, imported only when the runner is chosen.
        options: config key -> (constructor keyword, help); each key is also a ``--flag`` of
            ``ppt-bench run`` (``ray_address`` -> ``--ray-address``).
        install: what to install when the module's dependencies are missing.
    """

    target: str
    options: dict[str, tuple[str, str]] = field(default_factory=dict)
    install: str = "reinstall ppt-bench"


RUNNERS: Registry[RunnerEntry] = Registry("runner", ENTRY_POINT_GROUP)
RUNNERS.register("local", RunnerEntry("ppt_bench.runners.local:LocalRunner"))
RUNNERS.register(
    "ray",
    RunnerEntry(
        "ppt_bench.runners.ray_tune:RayRunner",
        {
            "ray_address": (
                "address",
                "Ray cluster address, HEAD_IP:6379 (default RAY_ADDRESS, else a private local "
                "instance)",
            ),
            "ray_storage": ("storage_path", "Ray Tune experiment folder (default ~/ray_results)"),
        },
        install="pip install 'ppt-bench[ray]'",
    ),
)


def runner_options() -> dict[str, str]:
    """Every runner's own options, config key -> help."""
    return {
        k: text for name in RUNNERS.names() for k, (_, text) in RUNNERS.get(name).options.items()
    }


def create_runner(
    name: str, out_csv: str | os.PathLike, *, progress: bool = True, **options: Any
) -> Runner:
    """Build the runner ``name`` with the options that are its own (others are ignored).

    Raises:
        UserError: an unknown name, or a runner whose optional dependencies are missing.
    """
    if name not in RUNNERS:
        raise UserError(f"runner must be one of {', '.join(RUNNERS)}, got {name!r}")
    entry = RUNNERS.get(name)
    module, _, cls = entry.target.partition(":")
    try:
        runner = getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise UserError(f"--runner {name} needs {err.name or err}: {entry.install}") from None
    own = {
        entry.options[k][0]: v for k, v in options.items() if k in entry.options and v is not None
    }
    return runner(out_csv, progress=progress, **own)


__all__ = ["RUNNERS", "RunnerEntry", "create_runner", "runner_options"]
