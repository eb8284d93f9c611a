"""What a sweep is: its settings from a TOML file and the command line, and its methods.

Every setting is declared once: the per-run ones on :class:`~ppt_bench.results.spec.RunSpec`, the
per-sweep ones in :data:`SWEEP_SETTINGS`, each runner's own in the runners' table
(:data:`ppt_bench.runners.RUNNERS`). The config-file keys, the flags of ``ppt-bench run``, the
type checks and ``ppt-bench run --print-config`` all come from those declarations.
:func:`ppt_bench.sweeps.grid.expand` turns a :class:`SweepConfig` into its runs.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppt_bench.core.errors import UserError
from ppt_bench.core.settings import SCHEDULE, Setting
from ppt_bench.results.spec import run_settings
from ppt_bench.runners import RUNNERS, runner_options

if TYPE_CHECKING:
    from ppt_bench.methods import Method

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The settings of a sweep that are no run's: a run only ever sees their effect.
SWEEP_SETTINGS = (
    Setting(
        "baseline",
        bool,
        True,
        "add an unreduced run per model and batch size",
        identity=SCHEDULE,
    ),
    Setting(
        "budget",
        str,
        (),
        "compare every method at a budget instead of at its own settings: gmacs=2.9, "
        "macs=0.65 (share of the unreduced MACs) or speedup=1.4 (measured); each method's knob "
        "(r, keep_rate, ratio, schedule) is set to meet it (default: none)",
        many=True,
        identity=SCHEDULE,
        metavar="KIND=VALUE",
        example=["macs=0.85", "macs=0.7", "macs=0.55"],
    ),
    Setting(
        "runner",
        str,
        "local",
        "local (in-process, one run after another) or ray (one Ray Tune trial per run)",
        identity=SCHEDULE,
    ),
    Setting(
        "out",
        str,
        None,
        "results file (default results/<sweep_name>.csv)",
        identity=SCHEDULE,
        metavar="CSV",
        example="results/deit-small-ppt.csv",
    ),
    Setting(
        "report",
        str,
        None,
        "report file (default reports/<sweep_name>.md)",
        identity=SCHEDULE,
        metavar="MD",
        example="reports/deit-small-ppt.md",
    ),
)


def all_settings() -> list[Setting]:
    """Every setting of ``ppt-bench run``: per run, per sweep, and each runner's own options
    (strings, ``ray_address``)."""
    options = [
        Setting(key, str, None, text, identity=SCHEDULE, example=None)
        for key, text in runner_options().items()
    ]
    return [*run_settings(), *SWEEP_SETTINGS, *options]


@dataclass
class MethodPlan:
    """One method of a sweep: fixed parameters and swept ones.

    Args:
        name: registry name.
        params: fixed parameters.
        sweep: parameter -> values; the method runs once per combination.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list[Any]] = field(default_factory=dict)

    def combinations(self) -> list[dict[str, Any]]:
        """The parameter sets this method runs with (fixed params updated by each sweep point)."""
        keys = sorted(self.sweep)
        points = itertools.product(*(self.sweep[k] for k in keys))
        return [{**self.params, **dict(zip(keys, point, strict=True))} for point in points]


@dataclass
class SweepConfig:
    """Everything ``ppt-bench run`` needs, after merging the config file and the CLI flags.

    One attribute per setting of :func:`all_settings`, named by its config key, defaults filled
    in, axes and list settings as lists; each setting is declared (help, flag, type) on
    :class:`~ppt_bench.results.spec.RunSpec` or in :data:`SWEEP_SETTINGS`, and only listed here,
    where a test checks that the two agree. Made by :func:`build_config`.

    Attributes:
        methods: the methods, from ``--method`` and the file's ``[methods.<name>]`` tables.
        runner_options: the runners' own options that were given (``ray_address``), by key.
    """

    # Per run: the settings of RunSpec.
    models: list[str]
    data: str | None
    single_class: bool
    checkpoint: str | None
    device: str
    dtype: list[str]
    compile: list[str]
    batch_sizes: list[int]
    seed: int
    metrics: list[str]
    n_images: int | None
    sweep_name: str
    workers: int
    cache: bool
    cache_dir: str | None
    rounds: int
    # Per sweep: SWEEP_SETTINGS.
    baseline: bool
    budget: list[str]
    runner: str
    out: str | None
    report: str | None
    methods: list[MethodPlan] = field(default_factory=list)
    runner_options: dict[str, Any] = field(default_factory=dict)

    @property
    def out_path(self) -> Path:
        return Path(self.out or f"results/{self.sweep_name}.csv")

    @property
    def report_path(self) -> Path:
        return Path(self.report or f"reports/{self.sweep_name}.md")


def _describe_sweep(settings: dict[str, Any], plans: list[MethodPlan]) -> str:
    """A name for a sweep given none that says what it runs, so that unnamed sweeps of other
    models, methods or data do not share one results file: ``deit_tiny_patch16_224-ppt-merge-
    digits``."""
    models = list(settings.get("models", []))
    data = settings.get("data") or "synthetic"
    parts = [*models[:2], *(["more"] if len(models) > 2 else [])]
    parts += [p.name for p in plans[:4]] + (["more"] if len(plans) > 4 else [])
    parts.append(Path(str(data)).name or "data")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))[:120]


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a sweep config file; unknown keys are an error (they are usually typos)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory, not a TOML file") from None
    except PermissionError:
        raise UserError(f"config file {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    keys = {s.key for s in all_settings()}
    unknown = sorted(set(raw) - keys - {"methods", "sweep"})
    if unknown:
        valid = ", ".join(sorted(keys | {"methods", "sweep"}))
        raise UserError(f"config file {path}: unknown keys {unknown}; valid keys: {valid}")
    raw.setdefault("sweep_name", path.stem)
    return raw


def _methods_from_config(
    raw: Any, global_sweep: dict[str, list[Any]], method_params: Callable[[str], dict[str, Any]]
) -> list[MethodPlan]:
    """``methods`` is a list of names or a table ``{name: {param = value, sweep = {...}}}``; a
    method's own sweep names only its parameters (the global one may name any method's)."""
    if isinstance(raw, list):
        raw = {name: {} for name in raw}
    if not isinstance(raw, dict):
        raise UserError("config 'methods' must be a list of names or a table of method tables")
    plans = []
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise UserError(f"config [methods.{name}] must be a table of parameters")
        params = dict(table)
        own_sweep = params.pop("sweep", {})
        if not isinstance(own_sweep, dict) or not all(
            isinstance(v, list) and v for v in own_sweep.values()
        ):
            raise UserError(f"config [methods.{name}.sweep] must map parameters to value lists")
        known = method_params(name)  # an unknown name raises here
        unknown = sorted(set(own_sweep) - set(known))
        if unknown:
            raise UserError(
                f"config [methods.{name}.sweep]: {name} has no parameter {', '.join(unknown)}; "
                f"its parameters: {', '.join(known) or 'none'}"
            )
        plans.append(MethodPlan(name, params, {**global_sweep, **own_sweep}))
    return plans


def build_config(
    file: dict[str, Any] | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    methods: Sequence[str | Method] | None = None,
    params: Sequence[tuple[str, Any]] = (),
    sweeps: Sequence[tuple[str, list[Any]]] = (),
) -> SweepConfig:
    """Merge a loaded config file with CLI settings; the CLI wins.

    Args:
        file: the dict from :func:`load_config` (or None).
        overrides: scalar and list settings given on the command line (None values ignored);
            a path may be a :class:`~pathlib.Path` (any ``os.PathLike``).
        methods: ``--method`` names, which replace the file's method list but keep its params;
            or method objects (the library's), each run with the parameters it holds.
        params: ``--param`` pairs; each applies to every selected method that has it.
        sweeps: ``--sweep`` pairs; each applies to every selected method that has it.
    """
    # Imported here: the methods import torch, and `ppt-bench --help` reads this module's
    # settings without it.
    from ppt_bench.methods import method_params
    from ppt_bench.methods.registry import method_setting

    file = dict(file or {})
    global_sweep = file.pop("sweep", {})
    if not isinstance(global_sweep, dict) or not all(
        isinstance(v, list) and v for v in global_sweep.values()
    ):
        raise UserError("config [sweep] must map parameters to non-empty value lists")
    plans = _methods_from_config(file.pop("methods", []), global_sweep, method_params)
    if methods:
        by_name = {p.name: p for p in plans}
        chosen = []
        for item in methods:
            if isinstance(item, str):
                chosen.append(by_name.get(item, MethodPlan(item, {}, dict(global_sweep))))
            else:  # a method object: its own parameters
                name, own = method_setting(item)
                chosen.append(MethodPlan(name, own, dict(global_sweep)))
        plans = chosen
    # One plan per method and parameters (two objects of one method may differ).
    plans = list(
        {(p.name, json.dumps(p.params, sort_keys=True, default=str)): p for p in plans}.values()
    )
    given = {**file, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    given = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in given.items()}
    declared = {s.key: s for s in all_settings()}
    unknown = sorted(set(given) - set(declared))
    if unknown:  # a library call's keyword (the CLI and load_config give declared keys only)
        raise UserError(f"unknown settings {unknown}; valid settings: {', '.join(declared)}")
    for key, value in given.items():
        if declared[key].axis or declared[key].many:
            given[key] = _as_list(value)
    _check_types(given, declared)
    values = {key: s.start for key, s in declared.items()} | given
    if "sweep_name" in given:
        check_sweep_name(given["sweep_name"])
    values["sweep_name"] = values["sweep_name"] or _describe_sweep(values, plans)
    if values["budget"]:
        # Imported here: budgets price models with torch and the MAC counters, which a sweep
        # without budgets and `ppt-bench --help` do without.
        from ppt_bench.sweeps.budget import parse_budget

        values["budget"] = [parse_budget(b).label for b in values["budget"]]
    options = runner_options()
    given_options = {k: v for k, v in values.items() if k in options and v is not None}
    settings = {k: v for k, v in values.items() if k not in options}
    config = SweepConfig(**settings, methods=plans, runner_options=given_options)
    if config.runner not in RUNNERS:
        raise UserError(f"runner must be one of {', '.join(RUNNERS)}, got {config.runner!r}")

    known = {p.name: method_params(p.name) for p in plans}  # unknown names raise here
    for flag, pairs in (("--param", params), ("--sweep", sweeps)):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise UserError(f"{flag} gives {', '.join(repeated)} more than once: keep one value")
    for key, value in params:
        owners = [p for p in plans if key in known[p.name]]
        _check_owned(key, owners, known, "--param")
        for plan in owners:
            plan.params[key] = value
            plan.sweep.pop(key, None)  # a CLI value beats a swept one from the file
    for key, swept in sweeps:
        owners = [p for p in plans if key in known[p.name]]
        _check_owned(key, owners, known, "--sweep")
        for plan in owners:
            plan.sweep[key] = swept
            plan.params.pop(key, None)
    for plan in plans:  # file sweeps apply only to the methods that have the parameter
        plan.sweep = {k: v for k, v in plan.sweep.items() if k in known[plan.name]}
    _check_file_sweeps(global_sweep, known)
    return config


def check_sweep_name(name: str) -> None:
    """A sweep's name names its files under ``results/`` and ``reports/``: a plain, visible
    file name (no folder, not hidden, not empty)."""
    if not name or name.startswith(".") or re.search(r"[/\\\x00-\x1f]", name):
        raise UserError(
            f"--sweep-name must be a plain file name (not empty, no '/', not starting with "
            f"'.'), got {name!r}; use --out and --report to write elsewhere"
        )


def _check_types(given: dict[str, Any], declared: dict[str, Setting]) -> None:
    """A single value of the declared type (lists are checked by ``RunSpec``)."""
    for key, value in given.items():
        s = declared[key]
        if s.axis or s.many or value is None:
            continue
        wrong_bool = s.kind is int and isinstance(value, bool)
        if not isinstance(value, s.kind) or wrong_bool:
            raise UserError(f"setting {key!r} must be of type {s.kind.__name__}, got {value!r}")


def _as_list(value: Any) -> list[Any]:
    """A setting given once or as a list; strings split on commas (``--metrics macs,tokens``)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[Any] = []
    for v in values:
        out += [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else [v]
    return out


def _check_owned(key: str, owners: list[MethodPlan], known: dict[str, dict], flag: str) -> None:
    if owners:
        return
    if not known:
        raise UserError(f"{flag} {key}=... needs a method: add --method NAME")
    valid = sorted({p for params in known.values() for p in params})
    raise UserError(
        f"{flag} {key}: no selected method ({', '.join(known)}) has a parameter {key!r}; "
        f"their parameters: {', '.join(valid) or 'none'}"
    )


def _check_file_sweeps(global_sweep: dict[str, list[Any]], known: dict[str, dict]) -> None:
    for key in global_sweep:
        if known and not any(key in params for params in known.values()):
            raise UserError(f"config [sweep] {key}: no selected method has a parameter {key!r}")


_HEADER = """\
# A ppt-bench sweep: `ppt-bench run --config example.toml`. Print this file with
# `ppt-bench run --print-config > sweep.toml` and edit it.
#
# The grid is models x dtypes x compile modes x batch sizes x (methods x swept parameters),
# plus one unreduced baseline run per model, dtype, compile mode and batch size. Flags given on
# the command line override the settings here (`--batch-size 32` replaces `batch_sizes`,
# `--method ppt` keeps only ppt with its table below, `--param r=16` fixes r for every method
# that has it). Unknown keys are an error. Every key is optional: each line shows an example,
# and its comment the default.
"""

_METHODS = """
# Parameters swept for every method that has them: one run per combination.
[sweep]
r = [16, 32, 50]

# Methods and their fixed parameters (`ppt-bench list` shows every method's parameters).
# A list of names works too: methods = ["ppt", "merge"].
[methods.ppt]
locations = [3, 6, 9]
threshold = 7e-5

[methods.ppt.sweep]  # sweeps for this method only; they add to (or replace) [sweep]
threshold = [3e-5, 7e-5, 1.5e-4]

[methods.merge]
locations = [3, 6, 9]

[methods.prune]
"""


def _toml(value: Any) -> str:
    """A value as TOML (strings, numbers, booleans, lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def example_config() -> str:
    """The example config file of ``ppt-bench run --print-config``: every key with its help,
    an example value and its default, then example method tables."""
    lines = [_HEADER]
    for s in all_settings():
        note = "none" if s.start in (None, []) else _toml(s.start)
        text = s.help if "default" in s.help else f"{s.help} (default: {note})"
        lines += textwrap.wrap(text, 98, initial_indent="# ", subsequent_indent="# ")
        shown = s.shown
        lines.append(f"{s.key} = {_toml(shown)}" if shown is not None else f"# {s.key} =")
    return "\n".join(lines) + "\n" + _METHODS
