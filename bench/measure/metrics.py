"""Metric groups: what ``--metrics`` can ask for, each defined once.

A :class:`MetricGroup` names the rows it writes (metric -> unit), says what it needs (a pass over
the data, the device to itself, a CUDA device), measures one run, and says which columns the
report shows for it. ``RunSpec`` validation, the CLI's ``--metrics`` help, Ray's resource
requests, the records' units and the report's table all read the groups from here.

Third-party groups register with :func:`register_metric_group` or through the entry-point group
``ppt_bench.measure.metrics`` (``name = "package.module:GROUP"``, a :class:`MetricGroup` object).

>>> register_metric_group(MetricGroup(
...     "energy", {"joules": "J"}, measure=lambda run: {"joules": read_meter(run.model)},
...     report=mean_columns(("energy (J)", "joules", ".1f"))))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ppt_bench.core.errors import UserError
from ppt_bench.core.registry import Registry
from ppt_bench.core.stats import Estimate
from ppt_bench.measure.cells import Cells, Columns, fmt, fmt_ci, mean_columns

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from ppt_bench.measure.accuracy import AccuracyResult
    from ppt_bench.measure.throughput import Latency, Speed
    from ppt_bench.results.spec import RunSpec

ENTRY_POINT_GROUP = "ppt_bench.metrics"


class Run(Protocol):
    """What a metric group's ``measure`` sees of one run being measured (the evaluation layer
    builds it): the patched model, and the data pass and timed loops that the groups share,
    each computed once, when a group first asks for it.

    Attributes:
        spec: the run.
        model: the patched model on the run's device.
        input_size: ``(3, H, W)`` of the model's data config.
        reduced: whether the method reduces tokens (not the baseline).
        labeled: whether the data pass read labelled images (after it ran).
        progress: whether to show progress bars.
    """

    spec: RunSpec
    model: nn.Module
    input_size: tuple[int, ...]
    reduced: bool
    labeled: bool
    progress: bool

    def data_pass(self) -> AccuracyResult:
        """Accuracy, agreement and token statistics over the data."""
        ...

    def speed(self) -> Speed:
        """Throughput and peak memory, paired with the unreduced model's for a reduced run."""
        ...

    def latency(self) -> Latency:
        """Latency per batch."""
        ...


@dataclass(frozen=True)
class MetricGroup:
    """One ``--metrics`` choice.

    Args:
        name: the choice (``accuracy``).
        units: metric name -> unit of the rows it writes; a name ending in ``_`` is a prefix
            (``tokens_block_`` covers ``tokens_block_0``, ``tokens_block_1``, ...).
        measure: one run's metrics from its :class:`Run`.
        report: the report's columns for one configuration (header -> cell), or None.
        needs_data: reads images (a pass over ``--data``), not only synthetic timing input.
        timing: needs the device to itself (Ray gives such a trial a whole GPU).
        cuda_only: has no meaning on a CPU.
        same_everywhere: its values do not depend on device, dtype, compile mode or batch size,
            so the report takes them from any run of the same method and parameters.
        unreduced_outputs: compares the run's outputs with the unreduced model's on the same
            images (which a sweep computes once and shares between its runs).
        paired_timing: times the run against the unreduced model in the same rounds.
        help: one line for ``--help`` (default: the first line of ``measure``'s docstring).
    """

    name: str
    units: Mapping[str, str]
    measure: Callable[[Run], dict[str, float]]
    report: Columns | None = None
    needs_data: bool = False
    timing: bool = False
    cuda_only: bool = False
    same_everywhere: bool = False
    unreduced_outputs: bool = False
    paired_timing: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if not self.help and self.measure.__doc__:
            object.__setattr__(self, "help", self.measure.__doc__.strip().splitlines()[0])

    def unit_of(self, metric: str) -> str | None:
        if metric in self.units:
            return self.units[metric]
        prefixes = (p for p in self.units if p.endswith("_") and metric.startswith(p))
        return next((self.units[p] for p in prefixes), None)


GROUPS: Registry[MetricGroup] = Registry("metric group", ENTRY_POINT_GROUP)


def register_metric_group(group: MetricGroup) -> MetricGroup:
    """Add a metric group; a second, different group under a taken name is an error."""
    return GROUPS.register(group.name, group)


def groups() -> dict[str, MetricGroup]:
    """Every metric group by name, built-in ones first, in the order the report shows them."""
    return {name: GROUPS.get(name) for name in GROUPS.names()}


def names() -> tuple[str, ...]:
    return tuple(GROUPS.names())


def get(name: str) -> MetricGroup:
    """The group called ``name``; :class:`UserError` naming the valid choices otherwise."""
    if name not in GROUPS:
        raise UserError(f"unknown metrics [{name!r}]: choose from {', '.join(names())}")
    return GROUPS.get(name)


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


def _measure_accuracy(run: Run) -> dict[str, Estimate | float]:
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
    "accuracy",
    ACCURACY_UNITS,
    _measure_accuracy,
    report=_accuracy_columns,
    needs_data=True,
    unreduced_outputs=True,
)


def _measure_macs(run: Run) -> dict[str, float]:
    """multiply-accumulates (torchprofile, fvcore) and parameters"""
    # Imported here: the counters (torchprofile, fvcore) are heavy, and most runs count no MACs.
    from ppt_bench.measure.macs import is_adaptive, measure_macs

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


def _measure_throughput(run: Run) -> dict[str, Estimate | float]:
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
    "throughput",
    THROUGHPUT_UNITS,
    _measure_throughput,
    _throughput_columns,
    timing=True,
    paired_timing=True,
)


def _measure_latency(run: Run) -> dict[str, Estimate]:
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


def _measure_memory(run: Run) -> dict[str, float]:
    """peak CUDA memory"""
    peak = run.speed().peak_mem_mb
    return {} if peak is None else {"peak_mem_mb": peak}


MEMORY_UNITS = {"peak_mem_mb": "MiB"}
MEMORY = MetricGroup(
    "memory", MEMORY_UNITS, _measure_memory, None, timing=True, cuda_only=True, paired_timing=True
)


TOKENS, POOLED = "tokens_block_", "pooled_frac_block_"
POOLED_COLUMN = "pooled fraction (block: frac)"


def _measure_tokens(run: Run) -> dict[str, float]:
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


for _group in (
    ACCURACY,
    MACS,
    THROUGHPUT,
    LATENCY,
    MEMORY,
    TOKENS_GROUP,
):  # in the order the report shows them
    register_metric_group(_group)


__all__ = [
    "Cells",
    "MetricGroup",
    "Run",
    "fmt",
    "get",
    "groups",
    "mean_columns",
    "names",
    "register_metric_group",
    "unit_of",
]
