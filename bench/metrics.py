"""Metric groups: what ``--metrics`` can ask for, each defined once.

A :class:`MetricGroup` names the rows it writes (metric -> unit), says what it needs (a pass over
the data, the device to itself, a CUDA device), measures one run, and says which columns the
report shows for it. ``RunSpec`` validation, the CLI's ``--metrics`` help, Ray's resource
requests, the records' units and the report's table all read the groups from here.

Third-party groups register with :func:`register_metric_group` or through the entry-point group
``ppt_bench.metrics`` (``name = "package.module:GROUP"``, a :class:`MetricGroup` object).

>>> register_metric_group(MetricGroup(
...     "energy", {"joules": "J"}, measure=lambda run: {"joules": read_meter(run.model)},
...     report=mean_columns(("energy (J)", "joules", ".1f"))))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from ppt_bench.errors import UserError
from ppt_bench.stats import Estimate

if TYPE_CHECKING:
    import pandas as pd

    from ppt_bench.evaluate import RunContext

ENTRY_POINT_GROUP = "ppt_bench.metrics"


@dataclass(frozen=True)
class Cells:
    """What a report column sees: one configuration's runs and the matching baseline's.

    Attributes:
        runs: the configuration's runs (one row per run, one column per metric).
        base: the baseline runs of the same model, device, dtype, compile mode and data.
        batch_sizes: the batch sizes speed was measured at, ascending.
        gmacs: mean GMACs of this method and parameters, from any run that counted them.
        base_gmacs: the same for the baseline.
    """

    runs: pd.DataFrame
    base: pd.DataFrame
    batch_sizes: list[int]
    gmacs: float | None = None
    base_gmacs: float | None = None

    @staticmethod
    def mean(runs: pd.DataFrame, metric: str) -> float | None:
        """The mean of ``metric`` over ``runs``, None where it was not measured."""
        return runs[metric].mean() if metric in runs and runs[metric].notna().any() else None

    @staticmethod
    def estimate(runs: pd.DataFrame, metric: str) -> Estimate | None:
        """``metric`` with its 95% interval (the interval columns ``low:<metric>``,
        ``high:<metric>`` of the report's runs frame) when one run measured it, or several
        that agree (the same images at other batch sizes); otherwise the mean without an
        interval; None where it was not measured."""
        if metric not in runs or not runs[metric].notna().any():
            return None
        measured = runs[runs[metric].notna()]
        if measured[metric].nunique() > 1:
            return Estimate(float(measured[metric].mean()))
        row = measured.iloc[0]
        low, high = (row.get(f"{bound}:{metric}", math.nan) for bound in ("low", "high"))
        return Estimate(float(row[metric]), float(low), float(high))

    @staticmethod
    def at(runs: pd.DataFrame, batch_size: int) -> pd.DataFrame:
        return runs[runs["batch_size"] == batch_size]

    @property
    def ideal_speedup(self) -> float | None:
        """Baseline MACs over this configuration's: the speedup if time followed MACs."""
        if not self.gmacs or self.base_gmacs is None:
            return None
        return self.base_gmacs / self.gmacs


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """A table cell: ``value`` formatted, '' for None or NaN."""
    if value is None or value != value:
        return ""
    return f"{value:{spec}}{suffix}"


NOT_SIGNIFICANT = "°"  # marks a difference from the baseline that is not significant at 5%


def fmt_ci(est: Estimate | None, spec: str, suffix: str = "", mark: bool = False) -> str:
    """A table cell for a figure and its 95% interval: ``96.67 [94.26, 98.08]`` (no brackets
    without an interval); ``mark`` appends :data:`NOT_SIGNIFICANT`."""
    if est is None or est.value != est.value:
        return ""
    text = f"{est.value:{spec}}{suffix}"
    if est.low == est.low and est.high == est.high:
        text += f" [{est.low:{spec}}, {est.high:{spec}}]"
    return text + (NOT_SIGNIFICANT if mark else "")


Columns = Callable[[Cells], dict[str, str]]


def mean_columns(*columns: tuple[str, str, str]) -> Columns:
    """Report columns that show a metric's mean: ``(header, metric, format spec)`` each."""
    return lambda c: {h: fmt(c.mean(c.runs, m), spec) for h, m, spec in columns}


@dataclass(frozen=True)
class MetricGroup:
    """One ``--metrics`` choice.

    Args:
        name: the choice (``accuracy``).
        units: metric name -> unit of the rows it writes; a name ending in ``_`` is a prefix
            (``tokens_block_`` covers ``tokens_block_0``, ``tokens_block_1``, ...).
        measure: one run's metrics from its :class:`~ppt_bench.evaluate.RunContext`.
        report: the report's columns for one configuration (header -> cell), or None.
        needs_data: reads images (a pass over ``--data``), not only synthetic timing input.
        timing: needs the device to itself (Ray gives such a trial a whole GPU).
        cuda_only: has no meaning on a CPU.
        same_everywhere: its values do not depend on device, dtype, compile mode or batch size,
            so the report takes them from any run of the same method and parameters.
        help: one line for ``--help`` (default: the first line of ``measure``'s docstring).
    """

    name: str
    units: Mapping[str, str]
    measure: Callable[[RunContext], dict[str, float]]
    report: Columns | None = None
    needs_data: bool = False
    timing: bool = False
    cuda_only: bool = False
    same_everywhere: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if not self.help and self.measure.__doc__:
            object.__setattr__(self, "help", self.measure.__doc__.strip().splitlines()[0])

    def unit_of(self, metric: str) -> str | None:
        if metric in self.units:
            return self.units[metric]
        prefixes = (p for p in self.units if p.endswith("_") and metric.startswith(p))
        return next((self.units[p] for p in prefixes), None)


_GROUPS: dict[str, MetricGroup] = {}
_ENTRY_POINTS_LOADED = False


def register_metric_group(group: MetricGroup) -> MetricGroup:
    """Add a metric group; a second, different group under a taken name is an error."""
    current = _GROUPS.get(group.name)
    if current is not None and current is not group:
        raise UserError(f"metric group {group.name!r} is already registered")
    _GROUPS[group.name] = group
    return group


def groups() -> dict[str, MetricGroup]:
    """Every metric group by name, built-in ones first, in the order the report shows them."""
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            register_metric_group(ep.load())
    return _GROUPS


def names() -> tuple[str, ...]:
    return tuple(groups())


def get(name: str) -> MetricGroup:
    """The group called ``name``; :class:`UserError` naming the valid choices otherwise."""
    group = groups().get(name)
    if group is None:
        raise UserError(f"unknown metrics [{name!r}]: choose from {', '.join(groups())}")
    return group


def unit_of(metric: str) -> str:
    """The unit of a metric name written by any group, per-block metrics included."""
    for group in groups().values():
        unit = group.unit_of(metric)
        if unit is not None:
            return unit
    raise ValueError(f"unknown metric {metric!r}")


def timing(metrics: Any) -> bool:
    """Whether any of the named groups needs the device to itself."""
    return any(get(m).timing for m in metrics)


def metrics_of(*, timing: bool | None = None, same_everywhere: bool | None = None) -> list[str]:
    """Metric names (prefixes included) of the groups with the given flags."""
    chosen = [
        g
        for g in groups().values()
        if (timing is None or g.timing == timing)
        and (same_everywhere is None or g.same_everywhere == same_everywhere)
    ]
    return [m for g in chosen for m in g.units]


# -- the built-in groups ----------------------------------------------------------------------


def _measure_accuracy(run: RunContext) -> dict[str, Estimate | float]:
    """top-1, top-5, loss; agreement and KL against the unreduced model; paired delta top-1"""
    return run.data_pass().metrics(labeled=run.labeled, reduced=run.reduced)


def _accuracy_columns(c: Cells) -> dict[str, str]:
    top1, base_top1 = c.estimate(c.runs, "top1"), c.mean(c.base, "top1")
    delta, p_value = c.estimate(c.runs, "delta_top1"), c.mean(c.runs, "p_value")
    if delta is None and top1 is not None and base_top1 is not None:  # a file without pairs
        delta = Estimate(top1.value - base_top1)
    return {
        "top-1 (%)": fmt_ci(top1, ".2f"),
        "Δ top-1 (pp)": fmt_ci(delta, "+.2f", mark=_not_significant(p_value)),
        "agreement (%)": fmt_ci(c.estimate(c.runs, "agreement_top1"), ".2f"),
    }


def _not_significant(p_value: float | None) -> bool:
    return p_value is not None and not p_value < 0.05


ACCURACY_UNITS = {
    "top1": "%",
    "top5": "%",
    "loss": "",
    "agreement_top1": "%",
    "kl": "",
    "unreadable_images": "",
    "delta_top1": "pp",  # against the unreduced model on the same images
    "p_value": "",  # exact McNemar test of that difference
}
ACCURACY = MetricGroup(
    "accuracy", ACCURACY_UNITS, _measure_accuracy, _accuracy_columns, needs_data=True
)
register_metric_group(ACCURACY)


def _measure_macs(run: RunContext) -> dict[str, float]:
    """multiply-accumulates (torchprofile, fvcore) and parameters"""
    from ppt_bench.macs import is_adaptive, measure_macs

    paths = run.data_pass().tokens.paths if is_adaptive(run.model) else None
    return measure_macs(run.model, run.input_size, paths, run.spec.seed, run.progress)


def _macs_columns(c: Cells) -> dict[str, str]:
    ratio = c.ideal_speedup
    return {
        "GMACs": fmt(c.gmacs, ".3f"),
        "MACs reduction (%)": fmt(None if ratio is None else 100 * (1 - 1 / ratio), ".1f"),
        "ideal speedup": fmt(ratio, ".2f", "x"),
    }


MACS_UNITS = {
    "gmacs": "GMACs",
    "gmacs_fvcore": "GMACs",
    "gmacs_single_input": "GMACs",
    "param_count": "M",
}
MACS = MetricGroup("macs", MACS_UNITS, _measure_macs, _macs_columns, same_everywhere=True)
register_metric_group(MACS)


def _measure_throughput(run: RunContext) -> dict[str, Estimate | float]:
    """images/s after warm-up; speedup paired with the unreduced model"""
    speed = run.speed()
    out: dict[str, Estimate | float] = {"samples_per_sec": speed.throughput}
    if speed.speedup is not None:
        out["speedup"] = speed.speedup
        out["baseline_samples_per_sec"] = speed.baseline_throughput
    out["timing_rounds"] = speed.rounds
    if speed.cpu_threads is not None:
        out["cpu_threads"] = speed.cpu_threads
    return out


def _throughput_columns(c: Cells) -> dict[str, str]:
    out, speedup = {}, None
    for bs in c.batch_sizes:
        runs = c.at(c.runs, bs)
        ips = c.estimate(runs, "samples_per_sec")
        # Paired in the run itself; the baseline, or a file written before pairing: the ratio
        # of the means.
        speedup = c.estimate(runs, "speedup")
        base_ips = c.mean(c.at(c.base, bs), "samples_per_sec")
        if speedup is None and ips is not None and base_ips:
            speedup = Estimate(ips.value / base_ips)
        tie = speedup is not None and speedup.low <= 1 <= speedup.high
        out[f"img/s @{bs}"] = fmt_ci(ips, ".1f")
        out[f"speedup @{bs}"] = fmt_ci(speedup, ".2f", "x", mark=tie)
    if c.batch_sizes:  # how much of the MAC reduction became speed
        ideal = c.ideal_speedup
        share = None if speedup is None or not ideal else 100 * speedup.value / ideal
        out[f"% of ideal @{c.batch_sizes[-1]}"] = fmt(share, ".0f")
    return out


THROUGHPUT_UNITS = {
    "samples_per_sec": "img/s",
    "speedup": "x",
    "baseline_samples_per_sec": "img/s",
    "timing_rounds": "",
    "cpu_threads": "",
}
THROUGHPUT = MetricGroup(
    "throughput", THROUGHPUT_UNITS, _measure_throughput, _throughput_columns, timing=True
)
register_metric_group(THROUGHPUT)


def _measure_latency(run: RunContext) -> dict[str, Estimate]:
    """p50/p90 ms per batch"""
    latency = run.latency()
    return {"latency_p50_ms": latency.p50, "latency_p90_ms": latency.p90}


def _latency_columns(c: Cells) -> dict[str, str]:
    if not c.batch_sizes:
        return {}
    small = c.at(c.runs, c.batch_sizes[0])
    p50 = c.estimate(small, "latency_p50_ms")
    return {f"latency p50 @{c.batch_sizes[0]} (ms)": fmt_ci(p50, ".2f")}


LATENCY_UNITS = {"latency_p50_ms": "ms", "latency_p90_ms": "ms"}
LATENCY = MetricGroup("latency", LATENCY_UNITS, _measure_latency, _latency_columns, timing=True)
register_metric_group(LATENCY)


def _measure_memory(run: RunContext) -> dict[str, float]:
    """peak CUDA memory"""
    peak = run.speed().peak_mem_mb
    return {} if peak is None else {"peak_mem_mb": peak}


MEMORY_UNITS = {"peak_mem_mb": "MiB"}
MEMORY = MetricGroup("memory", MEMORY_UNITS, _measure_memory, None, timing=True, cuda_only=True)
register_metric_group(MEMORY)


TOKENS, POOLED = "tokens_block_", "pooled_frac_block_"
POOLED_COLUMN = "pooled fraction (block: frac)"


def _measure_tokens(run: RunContext) -> dict[str, float]:
    """tokens after every block; ppt's pooled fraction per location"""
    return run.data_pass().tokens.metrics()


def _per_block(runs: pd.DataFrame, prefix: str) -> list[tuple[int, str]]:
    """``(block, column)`` of the per-block metric columns with a value, by block."""
    cols = [c for c in runs if c.startswith(prefix) and runs[c].notna().any()]
    return sorted((int(c[len(prefix) :]), c) for c in cols)


def _tokens_columns(c: Cells) -> dict[str, str]:
    blocks = _per_block(c.runs, TOKENS)
    pooled = ", ".join(f"{b}: {c.mean(c.runs, col):.2f}" for b, col in _per_block(c.runs, POOLED))
    return {
        "tokens out": fmt(c.mean(c.runs, blocks[-1][1]) if blocks else None, ".1f"),
        POOLED_COLUMN: pooled,
    }


TOKENS_UNITS = {TOKENS: "tokens", POOLED: ""}
TOKENS_GROUP = MetricGroup(
    "tokens", TOKENS_UNITS, _measure_tokens, _tokens_columns, needs_data=True
)
register_metric_group(TOKENS_GROUP)


__all__ = [
    "Cells",
    "MetricGroup",
    "fmt",
    "get",
    "groups",
    "mean_columns",
    "names",
    "register_metric_group",
    "unit_of",
]
