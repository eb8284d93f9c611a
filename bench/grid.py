"""Sweep grids: settings from a TOML file and CLI flags, expanded into validated ``RunSpec`` s.

The grid is models x dtypes x compile modes x batch sizes x (method, parameters x sweeps), plus
a baseline run per model, dtype, compile mode and batch size. :func:`validate` checks every run
(names, parameters, model depth, paths) before anything runs, so a mistake in run 40 of 40 costs
nothing. The schema is the example config that ``ppt-bench run --print-config`` prints.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ppt_bench import identity
from ppt_bench.errors import UserError
from ppt_bench.spec import RunSpec
from ppt_bench.throughput import DEFAULT_ROUNDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN_DATA = ("synthetic", "digits")


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

    The fields are the keys of a config file (``ppt-bench run --print-config``) and mirror
    the flags of ``ppt-bench run``; ``methods`` comes from ``[methods.<name>]`` tables.
    """

    models: list[str] = field(default_factory=list)
    methods: list[MethodPlan] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=lambda: [64])
    metrics: list[str] = field(default_factory=lambda: ["accuracy", "macs", "tokens"])
    data: str | None = None
    n_images: int | None = None
    checkpoint: str | None = None
    device: str = "cpu"
    dtype: list[str] = field(default_factory=lambda: ["fp32"])
    compile: list[bool | str] = field(default_factory=lambda: ["none"])
    seed: int = 0
    workers: int = 4
    rounds: int = DEFAULT_ROUNDS
    cache: bool = True
    cache_dir: str | None = None
    baseline: bool = True
    sweep_name: str = "sweep"
    runner: str = "local"
    runner_options: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    report: str | None = None
    budget: list[str] = field(default_factory=list)

    @property
    def out_path(self) -> Path:
        return Path(self.out or f"results/{self.sweep_name}.csv")

    @property
    def report_path(self) -> Path:
        return Path(self.report or f"reports/{self.sweep_name}.md")


def _scalar_keys() -> set[str]:
    """Top-level keys of the TOML file, besides ``methods`` and ``sweep``: the settings and
    every runner's own options (``ray_address``)."""
    from ppt_bench.runners.base import runner_options

    return {f.name for f in fields(SweepConfig)} - {"methods", "runner_options"} | set(
        runner_options()
    )


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


def parse_value(text: str, flag: str = "value") -> Any:
    """Read a CLI value as TOML (``50``, ``7e-5``, ``[3, 6, 9]``, ``true``); else a string.

    Raises:
        UserError: a value that starts like a TOML array or inline table (``[``, ``{``) but
            does not parse, such as ``[3,6``: it is a mistake, not a string.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as err:
        if text.lstrip().startswith(("[", "{")):
            raise UserError(
                f"{flag} {text!r} is not valid TOML ({err}): check its brackets and commas, "
                "e.g. [3, 6, 9]"
            ) from None
        return text


def parse_assignment(text: str, flag: str, usage: str | None = None) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` and read the value with :func:`parse_value`: the one reader of
    ``KEY=VALUE`` items (``run --param``, ``train --param``, ``visualize --method``).

    Args:
        text: the item.
        flag: the flag it came with, for messages.
        usage: what the flag expects, for the message of a malformed item.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        usage = usage or f"KEY=VALUE (e.g. {flag} r=50)"
        raise UserError(f"{flag} expects {usage}, got {text!r}")
    return key, parse_value(value.strip(), f"{flag} {key}:")


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """Read ``KEY=[V1,V2,...]`` for ``--sweep``."""
    key, values = parse_assignment(text, "--sweep")
    if not isinstance(values, list) or not values:
        raise UserError(
            f"--sweep expects KEY=[V1,V2,...] (e.g. --sweep r=[16,32,50]), got {text!r}"
        )
    return key, values


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
    keys = _scalar_keys()
    unknown = sorted(set(raw) - keys - {"methods", "sweep"})
    if unknown:
        valid = ", ".join(sorted(keys | {"methods", "sweep"}))
        raise UserError(f"config file {path}: unknown keys {unknown}; valid keys: {valid}")
    raw.setdefault("sweep_name", path.stem)
    return raw


def _methods_from_config(raw: Any, global_sweep: dict[str, list[Any]]) -> list[MethodPlan]:
    """``methods`` is a list of names or a table ``{name: {param = value, sweep = {...}}}``."""
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
        plans.append(MethodPlan(name, params, {**global_sweep, **own_sweep}))
    return plans


def build_config(
    file: dict[str, Any] | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    methods: Sequence[str] | None = None,
    params: Sequence[tuple[str, Any]] = (),
    sweeps: Sequence[tuple[str, list[Any]]] = (),
) -> SweepConfig:
    """Merge a loaded config file with CLI settings; the CLI wins.

    Args:
        file: the dict from :func:`load_config` (or None).
        overrides: scalar and list settings given on the command line (None values ignored).
        methods: ``--method`` names; they replace the file's method list but keep its params.
        params: ``--param`` pairs; each applies to every selected method that has it.
        sweeps: ``--sweep`` pairs; each applies to every selected method that has it.
    """
    from ppt_bench.methods import method_params

    file = dict(file or {})
    global_sweep = file.pop("sweep", {})
    if not isinstance(global_sweep, dict) or not all(
        isinstance(v, list) and v for v in global_sweep.values()
    ):
        raise UserError("config [sweep] must map parameters to non-empty value lists")
    plans = _methods_from_config(file.pop("methods", []), global_sweep)
    if methods:
        by_name = {p.name: p for p in plans}
        plans = [by_name.get(name, MethodPlan(name, {}, dict(global_sweep))) for name in methods]
    plans = list({p.name: p for p in plans}.values())  # one plan per method name
    settings = {**file, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    for key in ("models", "batch_sizes", "metrics", "dtype", "compile", "budget"):
        if key in settings:
            settings[key] = _as_list(settings[key])
    _check_types(settings)
    if settings.get("budget"):
        from ppt_bench.budget import parse_budget

        settings["budget"] = [parse_budget(b).label for b in settings["budget"]]
    from ppt_bench.runners.base import RUNNERS, runner_options

    options = {k: settings.pop(k) for k in runner_options() if k in settings}
    settings.setdefault("sweep_name", _describe_sweep(settings, plans))
    config = SweepConfig(**settings, methods=plans, runner_options=options)
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
    for key, values in sweeps:
        owners = [p for p in plans if key in known[p.name]]
        _check_owned(key, owners, known, "--sweep")
        for plan in owners:
            plan.sweep[key] = values
            plan.params.pop(key, None)
    for plan in plans:  # file sweeps apply only to the methods that have the parameter
        plan.sweep = {k: v for k, v in plan.sweep.items() if k in known[plan.name]}
    _check_file_sweeps(global_sweep, known)
    return config


# Expected types of the single-valued settings (lists are checked by RunSpec).
_TYPES: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(("data", "checkpoint", "device", "sweep_name", "runner"), str),
    **dict.fromkeys(("out", "report", "cache_dir"), str),
    **dict.fromkeys(("baseline", "cache"), bool),
    **dict.fromkeys(("seed", "workers", "n_images", "rounds"), int),
}


def _check_types(settings: dict[str, Any]) -> None:
    from ppt_bench.runners.base import runner_options

    options = runner_options()  # every runner option is a string
    for key, value in settings.items():
        want = str if key in options else _TYPES.get(key)
        wrong_bool = want is int and isinstance(value, bool)
        if want is not None and (not isinstance(value, want) or wrong_bool):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise UserError(f"setting {key!r} must be of type {names}, got {value!r}")


def _as_list(value: Any) -> list[Any]:
    """A setting given once or as a list (``"a,b"`` strings split on commas)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


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


def _absolute(path: str | None, builtin: Iterable[str] = ()) -> str | None:
    """Make a local path absolute so it means the same in every process (Ray workers chdir)."""
    if path is None or path in builtin or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def expand(config: SweepConfig) -> list[RunSpec]:
    """The grid: models x dtypes x compile modes x batch sizes x (methods x sweep points),
    each batch size's baseline first (so it runs next to the methods it is compared with), no
    repeats."""
    if not config.models:
        raise UserError("no model given: add --model NAME (see `ppt-bench list --models`)")
    if not config.methods and not config.baseline:
        raise UserError("nothing to run: add --method NAME or drop --no-baseline")
    runs: list[tuple[str, dict[str, Any]]] = [("baseline", {})] if config.baseline else []
    for plan in config.methods:
        runs += [(plan.name, params) for params in plan.combinations()]
    data, checkpoint = _absolute(config.data, BUILTIN_DATA), _absolute(config.checkpoint)
    common = dict(
        data=data,
        checkpoint=checkpoint,
        device=config.device,
        seed=config.seed,
        metrics=tuple(config.metrics),
        n_images=config.n_images,
        sweep=config.sweep_name,
        workers=config.workers,
        rounds=config.rounds,
        checkpoint_sha256=identity.checkpoint_digest(checkpoint),
        data_fingerprint=identity.data_fingerprint(data),
        machine=_machine(config),
        cache=config.cache,
        cache_dir=_absolute(config.cache_dir),
    )
    specs: dict[str, RunSpec] = {}
    grid = itertools.product(config.models, config.dtype, config.compile, config.batch_sizes)
    for model, dtype, compile_mode, batch_size in grid:
        for method, params in runs:
            try:
                spec = RunSpec(
                    model,
                    method,
                    params,
                    batch_size=batch_size,
                    dtype=dtype,
                    compile=compile_mode,
                    **common,
                )
            except TypeError as err:  # a wrongly typed setting in the config file
                raise UserError(f"invalid setting: {err}") from None
            specs.setdefault(spec.run_id, spec)
    return list(specs.values())


def _machine(config: SweepConfig) -> str:
    """Where the runs are measured: a Ray cluster by its address, else this machine."""
    address = config.runner_options.get("ray_address") or os.environ.get("RAY_ADDRESS")
    if config.runner == "ray" and address:
        return f"ray cluster {address}"
    return identity.machine()


def validate(specs: Sequence[RunSpec], *, check_cuda: bool = True) -> None:
    """Check what ``RunSpec`` cannot: models exist and fit each method, paths exist, CUDA.

    Raises:
        UserError: with a one-line message naming the problem and the fix.
    """
    from ppt_bench.methods import create_method
    from ppt_bench.models import check_weights, describe_vit, unpatchable_reason

    for spec in specs:
        info = describe_vit(spec.model)
        if spec.method != "baseline":
            if info is None:
                raise UserError(
                    f"{spec.method!r} cannot reduce the tokens of {spec.model!r}: "
                    f"{unpatchable_reason(spec.model)}"
                )
            try:
                method = create_method(spec.method, **spec.params)
                method.check_fits(info)
                method.check_budget(info, given=spec.params)
            except UserError as err:
                raise UserError(
                    f"{spec.method} on {spec.model} ({info.depth} blocks): {err}"
                ) from None
    for spec in specs[:1]:  # the paths and device are shared by the whole grid
        check_paths(spec)
        if check_cuda and spec.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"--device {spec.device}: CUDA is not available; use --device cpu")
    if len(specs) != len({s.run_id for s in specs}):
        raise UserError(
            "the grid repeats a run; remove duplicate --model, --batch-size, --dtype or --compile "
            "values"
        )
    for model, checkpoint in dict.fromkeys((s.model, s.checkpoint) for s in specs):
        check_weights(model, checkpoint)  # once per model before the runs, not in every run


def check_paths(spec: RunSpec) -> None:
    """Check the data folder's layout (without decoding an image) and the checkpoint."""
    data = spec.data
    if data is not None and data not in BUILTIN_DATA:
        if not Path(data).is_dir():
            raise UserError(
                f"--data {data} is not a directory: pass an ImageFolder root (ImageNet val "
                "layout), 'digits' or 'synthetic'"
            )
        from ppt_bench.data import image_folder_root

        try:
            image_folder_root(data)
        except UserError as err:
            raise UserError(f"--data: {err}") from None
    ckpt = spec.checkpoint
    if ckpt is not None and "://" not in ckpt and not Path(ckpt).is_file():
        raise UserError(f"--checkpoint {ckpt} does not exist: pass a weights file or a URL")


def grid_hash(specs: Iterable[RunSpec]) -> str:
    """A short hash of the runs in a grid (order-free), to name its Ray Tune experiment."""
    blob = ",".join(sorted(s.run_id for s in specs))
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


__all__ = [
    "MethodPlan",
    "SweepConfig",
    "build_config",
    "expand",
    "load_config",
    "parse_assignment",
    "parse_sweep",
    "parse_value",
    "validate",
]
