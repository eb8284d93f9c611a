"""A sweep's runs: :func:`expand` turns a :class:`~ppt_bench.sweeps.config.SweepConfig` into
validated ``RunSpec`` s, each made by the one factory of specs, :func:`make_spec`.

The grid is models x dtypes x compile modes x batch sizes x (method, parameters x sweeps), plus
a baseline run per model, dtype, compile mode and batch size. :func:`validate` checks every run
(names, parameters, model depth, paths) before anything runs, so a mistake in run 40 of 40 costs
nothing.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ppt_bench.core import identity
from ppt_bench.core.errors import UserError
from ppt_bench.data.loader import check_cache_outside, image_folder_root
from ppt_bench.engine.evaluate import cache_dir
from ppt_bench.methods import create_method
from ppt_bench.models.build import (
    check_checkpoint_path,
    check_weights,
    describe_vit,
    unpatchable_reason,
)
from ppt_bench.results.spec import RunSpec, run_settings
from ppt_bench.sweeps.config import SweepConfig

BUILTIN_DATA = ("synthetic", "digits")
# Settings whose local paths the factory makes absolute, so that they mean the same in every
# process (Ray workers chdir).
_PATHS = {"data": BUILTIN_DATA, "checkpoint": (), "cache_dir": ()}


def _absolute(key: str, path: str | os.PathLike | None, builtin: Iterable[str] = ()) -> str | None:
    """A local path made absolute, as text (a :class:`~pathlib.Path` too); a built-in data set's
    name, a URL and None as they are."""
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if path == "":  # Path("") would be the working folder, which no one means by it
        raise UserError(f"{key} is an empty path: give a path or leave the setting out")
    if path is None or path in builtin or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def experiment_identity(
    data: str | None, checkpoint: str | None, machine: str | None = None
) -> dict[str, str]:
    """What makes the experiment of runs on ``data`` with ``checkpoint`` (absolute paths): the
    content hashes of the weights and the data, and the machine (default: this one)."""
    return {
        "checkpoint_sha256": identity.checkpoint_digest(checkpoint),
        "data_fingerprint": identity.data_fingerprint(data),
        "machine": machine or identity.machine(),
    }


def make_spec(
    model: str,
    method: str = "baseline",
    params: dict[str, Any] | None = None,
    *,
    experiment: dict[str, str] | None = None,
    **settings: Any,
) -> RunSpec:
    """The one factory of ``RunSpec`` s: ``ppt-bench run``, ``ppt-bench demo``, the library's
    :func:`ppt_bench.api.sweep` and every test make their runs here.

    Local paths become absolute, and the experiment's identity (the weights' and data's
    content hashes, the machine) is filled in, so that the run's id and the key of its
    unreduced model's outputs name exactly what it measures.

    Args:
        model: timm model name.
        method: registry name.
        params: the method's parameters.
        experiment: the identity from :func:`experiment_identity`, when a sweep computed it once
            for all its runs; None: computed now.
        settings: the other fields of :class:`~ppt_bench.results.spec.RunSpec`.
    """
    for key, builtin in _PATHS.items():
        settings[key] = _absolute(key, settings.get(key), builtin)
    if experiment is None:
        experiment = experiment_identity(settings["data"], settings["checkpoint"])
    try:
        return RunSpec(model, method, dict(params or {}), **settings, **experiment)
    except TypeError as err:  # a wrongly typed setting in the config file
        raise UserError(f"invalid setting: {err}") from None


def grid_size(config: SweepConfig) -> int:
    """How many runs :func:`expand` (and a sweep's budgets) will make of ``config``, counted
    without making them, so that a sweep can say how big it is before it checks them."""
    points = math.prod(len(getattr(config, s.key)) for s in run_settings() if s.axis)
    methods = sum(len(plan.combinations()) for plan in config.methods)
    return points * (int(config.baseline) + methods * max(1, len(config.budget or ())))


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
    declared = run_settings()
    axes = [s for s in declared if s.axis]  # model, dtype, compile, batch size: outermost first
    common = {s.field: getattr(config, s.key) for s in declared if not s.axis}
    for key, builtin in _PATHS.items():
        common[key] = _absolute(key, common[key], builtin)
    experiment = experiment_identity(common["data"], common["checkpoint"], _machine(config))
    specs: dict[str, RunSpec] = {}
    for point in itertools.product(*(getattr(config, s.key) for s in axes)):
        where = {s.field: value for s, value in zip(axes, point, strict=True)}
        for method, params in runs:
            spec = make_spec(method=method, params=params, experiment=experiment, **where, **common)
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
        if check_cuda and spec.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {spec.device}: CUDA is not available; use --device cpu")
    if len(specs) != len({s.run_id for s in specs}):
        raise UserError(
            "the grid repeats a run; remove duplicate --model, --batch-size, --dtype or --compile "
            "values"
        )
    for model, checkpoint in dict.fromkeys((s.model, s.checkpoint) for s in specs):
        check_weights(model, checkpoint)  # once per model before the runs, not in every run


def check_paths(spec: RunSpec) -> None:
    """Check the data folder's layout (without decoding an image), that the image cache lies
    outside it, and the checkpoint."""
    data = spec.data
    if data is not None and data not in BUILTIN_DATA:
        if not Path(data).is_dir():
            raise UserError(
                f"--data {data} is not a directory: pass an ImageFolder root (ImageNet val "
                "layout), 'digits' or 'synthetic'"
            )
        try:
            image_folder_root(data, single_class=spec.single_class)
        except UserError as err:
            raise UserError(f"--data: {err}") from None
        cache = cache_dir(spec)
        if cache is not None:
            check_cache_outside(data, cache)
    if spec.checkpoint is not None:
        check_checkpoint_path(spec.checkpoint)


__all__ = ["check_paths", "expand", "experiment_identity", "grid_size", "make_spec", "validate"]
