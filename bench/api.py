"""The library API: run a sweep, read its results, write its report, see where a model's time
goes. The ``ppt-bench`` commands are thin layers over it.

>>> import ppt_bench
>>> results = ppt_bench.sweep(
...     models=["deit_tiny_patch16_224"], methods=["ppt", "tome"], sweep={"r": [8, 16]},
...     metrics=["macs", "tokens"], batch_sizes=[8], sweep_name="notebook")
>>> results.pivot_table(index=["method", "r"], columns="metric", values="value")
>>> ppt_bench.write_report("results/notebook.csv", "reports/notebook.md")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from ppt_bench.core.errors import ArgumentError, UserError, check_output_path
from ppt_bench.measure import metrics
from ppt_bench.measure.cost import DEFAULT_FORWARDS, profile_cost
from ppt_bench.measure.outcomes import store_folder
from ppt_bench.measure.throughput import iterations
from ppt_bench.methods import Method
from ppt_bench.results.records import COLUMNS, read_results
from ppt_bench.results.report import write_report
from ppt_bench.results.spec import RunSpec
from ppt_bench.runners import create_runner
from ppt_bench.runners.base import Runner, SweepSummary
from ppt_bench.sweeps.budget import Plan, record_skipped, resolve_sweep
from ppt_bench.sweeps.config import SweepConfig, build_config, load_config
from ppt_bench.sweeps.grid import expand, validate


@dataclass
class Sweep:
    """A sweep ready to run: its configuration and its runs, each checked.

    Attributes:
        config: the merged settings (:class:`~ppt_bench.sweeps.config.SweepConfig`).
        specs: the runs, in the order they run.
        skipped: at budgets, the runs out of their budget's reach, with the reason.
        budgets: at budgets, how each method's knob was resolved
        (:class:`~ppt_bench.sweeps.budget.Plan`).
    """

    config: SweepConfig
    specs: list[RunSpec]
    skipped: list[tuple[RunSpec, str]] = field(default_factory=list)
    budgets: Plan | None = None

    @classmethod
    def plan(cls, config: SweepConfig, *, measure: bool = True) -> Sweep:
        """Expand ``config`` into its runs, set each method's knob at each budget, and check
        every run before any runs: names, parameters, models, paths, the device and the timing
        settings.

        Args:
            config: the sweep.
            measure: resolve speed budgets by timing; without, they stay at their MAC starting
                point and nothing is timed (``--plan``).

        Raises:
            UserError: the first problem, in one line.
        """
        # Every name the sweep writes, as it will write it: a name too long for the file
        # system would fail only once the first run is done.
        out = "--out" if config.out else "--sweep-name's results file"
        check_output_path(config.out_path, out)
        check_output_path(store_folder(config.out_path), f"{out}'s outcomes", directory=True)
        specs = expand(config)
        budgets = None
        if config.budget:  # the knobs are set first: the defaults need not fit the model
            budgets = resolve_sweep(specs, config.budget, measure=measure)
            specs = budgets.specs
        validate(specs, check_cuda=config.runner == "local")
        if any(metrics.timing(s.metrics) for s in specs):
            iterations()  # a bad PPT_BENCH_WARMUP / PPT_BENCH_ITERS would fail every run
        return cls(config, specs, budgets.skipped if budgets else [], budgets)

    def budget_table(self) -> str:
        """Each method's setting at each budget: knob value, achieved GMACs and share."""
        return self.budgets.table() if self.budgets else ""

    def runner(self, *, progress: bool = True) -> Runner:
        """The configured runner, built (and so checked: a Ray address that does not answer
        stops here)."""
        return create_runner(
            self.config.runner,
            self.config.out_path,
            progress=progress,
            **self.config.runner_options,
        )

    def run(self, *, progress: bool = True, runner: Runner | None = None) -> SweepSummary:
        """Run what the results file does not hold yet with the configured runner (or
        ``runner``), appending each run's rows as it finishes; a failed run is a recorded row,
        not an exception, and a run out of its budget's reach is recorded as skipped first."""
        runner = runner or self.runner(progress=progress)
        if self.skipped:
            record_skipped(self.skipped, self.config.out_path)
        return runner.run(self.specs)

    def results(self) -> pd.DataFrame:
        """The rows of this sweep's runs in its results file, one per (run, metric)."""
        path = self.config.out_path
        if not path.exists():  # every run failed before writing, or there was none
            return pd.DataFrame(columns=list(COLUMNS))
        df = read_results(path)
        return df[df["run_id"].isin({s.run_id for s in self.specs})].reset_index(drop=True)


def sweep(
    models: str | Sequence[str] | None = None,
    methods: str | Method | Sequence[str | Method] | None = None,
    *,
    config: str | os.PathLike | None = None,
    params: Mapping[str, Any] | None = None,
    sweep: Mapping[str, Any] | None = None,
    progress: bool = False,
    **settings: Any,
) -> pd.DataFrame:
    """Run a grid of models x methods x parameters x batch sizes and return its results.

    Args:
        models: a timm model name, or a list of them.
        methods: a method name or a method object (``create_method("ppt", r=8)``, run with the
            parameters it holds), or a list of them; the unreduced baseline runs too, unless
            ``baseline=False``.
        config: a sweep config file (``ppt-bench run --print-config``); the arguments here win.
        params: fixed method parameters, each for every method that has it (``--param``).
        sweep: swept method parameters, each for every method that has it (``--sweep``): a
            list of values, or one value.
        progress: show progress bars.
        settings: any other setting of ``ppt-bench run`` by its config key (``batch_sizes``,
            ``metrics``, ``data``, ``device``, ``runner``, ``out``, ...); a path may be a
            :class:`~pathlib.Path`.

    Returns:
        The tidy rows of the sweep's runs (one per run and metric, the results file's columns);
        ``.attrs["summary"]`` holds the :class:`~ppt_bench.runners.base.SweepSummary` (runs
        skipped as done, finished, failed with their errors).

    Raises:
        UserError: a mistake in the settings, found before anything runs.
        ArgumentError: an argument of a type it does not take (a ``UserError`` and a
            ``TypeError``), named in the message with the types it takes.
    """
    built = build_config(
        load_config(config) if config is not None else None,
        overrides={"models": _listed(models, "models", str, "a model name"), **settings},
        methods=_listed(methods, "methods", (str, Method), "a method name, a Method object"),
        params=list(_table(params, "params").items()),
        sweeps=[(key, _values(key, value)) for key, value in _table(sweep, "sweep").items()],
    )
    planned = Sweep.plan(built)
    summary = planned.run(progress=progress)
    results = planned.results()
    results.attrs["summary"] = summary
    return results


def _listed(value: Any, argument: str, kinds: type | tuple[type, ...], what: str) -> list | None:
    """An argument that takes one item or a list of them, as a list (None when it gives none).

    Raises:
        ArgumentError: the argument, or an item of it, is of another type.
    """
    if value is None:
        return None
    if isinstance(value, kinds):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (Mapping, bytes)):
        items = list(value)
        wrong = next((item for item in items if not isinstance(item, kinds)), None)
        if wrong is None:
            return items or None
        value = wrong
    raise ArgumentError(
        f"{argument} takes {what} or a list of them, got {value!r} ({type(value).__name__})"
    )


def _table(value: Any, argument: str) -> dict[str, Any]:
    """A mapping of parameter names to values, as a dict (empty for None).

    Raises:
        ArgumentError: not a mapping, or a name that is not a string.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ArgumentError(
            f"{argument} takes a dict of parameter names to values, such as {{'r': 8}}, got "
            f"{value!r} ({type(value).__name__})"
        )
    return dict(value)


def _values(key: str, value: Any) -> list[Any]:
    """The values a parameter is swept over: a list (or tuple, or any other iterable that is not
    a string), or one value alone.

    Raises:
        UserError: an empty list.
    """
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
        values = list(value)
        if not values:
            raise UserError(f"sweep[{key!r}] is an empty list: give one value or more")
        return values
    return [value]


def cost_breakdown(
    model: nn.Module, x: torch.Tensor, *, forwards: int = DEFAULT_FORWARDS, dtype: str = "fp32"
) -> pd.DataFrame:
    """Where one forward of ``model`` on ``x`` spends its time, one row per part.

    ``model`` is a timm model, patched by a method (``create_method("tome", r=8).apply(m)``) or
    not; ``x`` a batch on its device. Two warm-up forwards, then ``forwards`` profiled ones
    (:func:`ppt_bench.measure.cost.profile_cost`, the ``cost`` metric group's measurement).

    Returns:
        Columns ``part``, ``ms`` (median per forward), ``low``, ``high`` (its 95% interval),
        ``share`` of the forward and ``device_ms`` (CUDA kernel time), a row per part, then
        ``outside the parts`` and ``forward``; ``.attrs`` holds ``ops`` (operators per
        forward), ``syncs``, ``host_ms`` (time outside operators) and ``kernels`` (the attention
        kernel of each block).
    """
    model.eval()
    return profile_cost(model, x, forwards=forwards, dtype=dtype).frame()


__all__ = ["Sweep", "cost_breakdown", "read_results", "sweep", "write_report"]
