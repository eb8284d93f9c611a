"""Metric groups: what ``--metrics`` can ask for, each defined once.

A :class:`MetricGroup` names the rows it writes, each with its declaration (:class:`Metric`: its
unit, which way is better, and how the report's table and the leaderboard show it), says what
it needs (a pass over the data, the device to itself, a CUDA device) and measures one run.
``RunSpec`` validation, the CLI's ``--metrics`` help, Ray's resource requests, the records'
units, the report's tables and the leaderboards all read the groups from here: the report and
the leaderboard know no metric by name, so a new metric reaches them from its declaration.

Third-party groups register with :func:`register_metric_group` or through the entry-point group
``ppt_bench.metrics`` (``name = "package.module:GROUP"``, a :class:`MetricGroup` object).

>>> register_metric_group(MetricGroup(
...     "energy",
...     {"joules": Metric("J", higher_is_better=False, label="energy", spec=".1f", table=True,
...                       leaderboard=Ranked(IntervalOverlap(), best="most frugal"))},
...     measure=lambda run: {"joules": read_meter(run.model)}))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ppt_bench.core.errors import UserError
from ppt_bench.core.registry import Registry
from ppt_bench.core.stats import Estimate
from ppt_bench.measure.cells import Cells, Columns, fmt, fmt_ci, mean_columns

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from ppt_bench.measure.accuracy import AccuracyResult
    from ppt_bench.measure.cost import Cost
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

    def cost(self) -> Cost:
        """Where a forward's time goes, from a few profiled forwards."""
        ...


# -- what a metric declares --------------------------------------------------------------------


@dataclass(frozen=True)
class McNemar:
    """The paired test of a metric measured image by image: the best method against each other
    on the same images by the exact McNemar test of a per-image outcome, the p-values
    Holm-corrected for the number of comparisons. A metric ranked by it ranks the rows of the
    leaderboard (the first such metric in the groups' order), and the report's tables at equal
    cost compare the methods by it.

    Args:
        outcome: the attribute of :class:`~ppt_bench.measure.outcomes.Outcomes` that holds the
            per-image outcome (a bool per image: ``"correct"``).
        after: the metric whose leaderboard column the test's column (``p vs best (Holm)``)
            follows; the ranked metric's own by default.
    """

    outcome: str
    after: str = ""


@dataclass(frozen=True)
class IntervalOverlap:
    """The comparison of a metric measured with a 95% interval, each method paired with the
    unreduced model (not with each other): a method whose interval overlaps the best's ties with
    it. The leaderboard marks the best cell and those tied with it, at each batch size for a
    group that times (:attr:`MetricGroup.timing`)."""


@dataclass(frozen=True)
class Shown:
    """The leaderboard of a sweep at budgets shows the metric in a column: its figure with its
    interval (at each batch size for a group that times).

    Args:
        reading: a sentence for the paragraph that says how to read the leaderboards.
    """

    reading: str = ""


@dataclass(frozen=True)
class Ranked:
    """The leaderboard shows the metric as :class:`Shown` does and ranks the methods by it, in
    its direction (:attr:`Metric.higher_is_better`), with a paired test of the best against the
    others.

    Args:
        test: :class:`McNemar` or :class:`IntervalOverlap`.
        best: the word for the best, in the leaderboard's sentence and marks (``fastest``).
        reading: as for :class:`Shown`.
    """

    test: McNemar | IntervalOverlap
    best: str = "best"
    reading: str = ""


@dataclass(frozen=True)
class Metric:
    """One metric a group writes, declared once: its unit, which way is better, and where the
    report shows it.

    Args:
        unit: the unit of its rows (``"%"``).
        higher_is_better: whether a higher figure is better (False: a lower one); None for a
            descriptive figure (a p-value, a count, the number of tokens).
        label: its name in table headers and sentences (``"top-1"``; default: the metric's
            name). A header adds `` @<batch size>`` for a group that times, then the unit in
            parentheses unless the unit is empty, is the label, or follows every figure
            (``suffix``).
        spec: the format spec of its figures.
        suffix: written after each figure in a cell (``"x"``).
        table: the report's table shows it in a column of its own (at each timed batch size for
            a group that times): its figure with its interval, or the mean of runs that differ.
        text: its report column holds text, not a figure (aligned left).
        leaderboard: how the leaderboard of a sweep at budgets shows it: None (not at all),
            :class:`Shown` or :class:`Ranked`.
        cost: for the one metric budgets are set in, what it counts, for sentences (``"MACs"``):
            the report sorts each table by it, takes it from any run of the same method and
            parameters, compares the headline metric (:func:`headline`) at equal cost, and the
            leaderboard shows it first.
        over_images: a figure over the images of the data pass: the report refuses to average
            runs over different numbers of images.
    """

    unit: str = ""
    higher_is_better: bool | None = None
    label: str = ""
    spec: str = ".2f"
    suffix: str = ""
    table: bool = False
    text: bool = False
    leaderboard: Shown | Ranked | None = None
    cost: str = ""
    over_images: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.leaderboard, Ranked) and self.higher_is_better is None:
            raise ValueError(f"metric {self.label!r} is ranked: declare higher_is_better")

    def header(self, batch_size: int | None = None) -> str:
        """Its column header, at ``batch_size`` for a group that times."""
        name = self.label + ("" if batch_size is None else f" @{batch_size}")
        shown = self.unit and self.unit not in (self.label, self.suffix)
        return f"{name} ({self.unit})" if shown else name

    def cell(self, estimate: Estimate | None, mark: bool = False) -> str:
        """A table cell of one of its figures (:func:`~ppt_bench.measure.cells.fmt_ci`)."""
        return fmt_ci(estimate, self.spec, self.suffix, mark)

    def figure(self, value: float) -> str:
        """One of its figures in a sentence, with its unit: ``98.06%``."""
        return f"{value:{self.spec}}{self.unit}"


@dataclass(frozen=True)
class MetricGroup:
    """One ``--metrics`` choice.

    Args:
        name: the choice (``accuracy``).
        metrics: metric name -> its :class:`Metric` (or only its unit: a descriptive figure the
            report shows only through ``report``), for the rows it writes; a name ending in ``_``
            is a prefix (``tokens_block_`` covers ``tokens_block_0``, ``tokens_block_1``, ...).
            Every value is a :class:`Metric` once the group is made.
        measure: one run's metrics from its :class:`Run`.
        report: the report's columns for one configuration (header -> cell) beyond the
            declared ones (:meth:`columns`), or None.
        needs_data: reads images (a pass over ``--data``), not only synthetic timing input.
        timing: needs the device to itself (Ray gives such a trial a whole GPU); its figures are
            shown at each batch size they were timed at.
        cuda_only: has no meaning on a CPU.
        same_everywhere: its values do not depend on device, dtype, compile mode or batch size,
            so the report takes them from any run of the same method and parameters.
        unreduced_outputs: compares the run's outputs with the unreduced model's on the same
            images (which a sweep computes once and shares between its runs).
        paired_timing: times the run against the unreduced model in the same rounds.
        help: one line for ``--help`` (default: the first line of ``measure``'s docstring).
    """

    name: str
    metrics: Mapping[str, Metric | str]
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
        declared = {n: m if isinstance(m, Metric) else Metric(m) for n, m in self.metrics.items()}
        declared = {n: m if m.label else replace(m, label=n) for n, m in declared.items()}
        object.__setattr__(self, "metrics", declared)

    @property
    def units(self) -> dict[str, str]:
        """Metric name (or prefix) -> unit."""
        return {name: m.unit for name, m in self.metrics.items()}

    def declaration(self, metric: str) -> Metric | None:
        """The declaration of a metric name it writes, per-block metrics included."""
        if metric in self.metrics:
            return self.metrics[metric]
        # A name ending in "_" declares a prefix; one starting with "*" also any start.
        prefixes = (p for p in self.metrics if p.endswith("_") and fnmatchcase(metric, p + "*"))
        return next((self.metrics[p] for p in prefixes), None)

    def unit_of(self, metric: str) -> str | None:
        declared = self.declaration(metric)
        return None if declared is None else declared.unit

    def columns(self, cells: Cells) -> dict[str, str]:
        """The report's columns for one configuration: one per metric declared ``table`` (at
        each timed batch size for a group that times, the batch sizes outermost), then those of
        :attr:`report`, which fill a declared column in its place or add columns after them."""
        out = {}
        for batch_size in cells.batch_sizes if self.timing else [None]:
            runs = cells.runs if batch_size is None else cells.at(cells.runs, batch_size)
            for name, m in self.metrics.items():
                if m.table and not name.endswith("_"):
                    out[m.header(batch_size)] = m.cell(cells.estimate(runs, name))
        if self.report is not None:
            out.update(self.report(cells))
        return out


class Declared(NamedTuple):
    """A metric with its declaration and the group that writes it."""

    name: str
    metric: Metric
    group: MetricGroup


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
    return [m for g in chosen for m in g.metrics]


def declared() -> list[Declared]:
    """Every metric the groups declare, prefixes included, in the groups' order."""
    return [Declared(n, m, g) for g in groups().values() for n, m in g.metrics.items()]


def cost() -> Declared | None:
    """The metric budgets are set in (declared with ``cost``), if a group declares one."""
    return next((d for d in declared() if d.metric.cost), None)


def headline() -> Declared | None:
    """The metric the leaderboard ranks its rows by and the report compares at equal cost: the
    first declared :class:`Ranked` by :class:`McNemar`."""
    return next(
        (
            d
            for d in declared()
            if isinstance(d.metric.leaderboard, Ranked)
            and isinstance(d.metric.leaderboard.test, McNemar)
        ),
        None,
    )


def on_leaderboard() -> list[Declared]:
    """The metrics the leaderboard shows, in its order: the cost first, then the groups'."""
    shown = [d for d in declared() if d.metric.leaderboard is not None and not d.name.endswith("_")]
    return sorted(shown, key=lambda d: not d.metric.cost)  # stable: the groups' order after it


# -- the built-in groups ----------------------------------------------------------------------


def _measure_accuracy(run: Run) -> dict[str, Estimate | float]:
    """top-1, top-5, loss; agreement and KL against the unreduced model; paired delta top-1"""
    return run.data_pass().metrics(labeled=run.labeled, reduced=run.reduced)


def _accuracy_columns(c: Cells) -> dict[str, str]:
    """Δ top-1 from top-1 where a file has no pairs, marked where it is not significant."""
    top1, base_top1 = c.estimate(c.runs, "top1"), c.mean(c.base, "top1")
    delta, p_value = c.estimate(c.runs, "delta_top1"), c.mean(c.runs, "p_value")
    if delta is None and top1 is not None and base_top1 is not None:  # a file without pairs
        delta = Estimate(top1.value - base_top1)
    declared = ACCURACY_METRICS["delta_top1"]
    return {declared.header(): declared.cell(delta, mark=_not_significant(p_value))}


def _not_significant(p_value: float | None) -> bool:
    return p_value is not None and not p_value < 0.05


_BY_TOP1 = Ranked(
    McNemar("correct", after="p_value"),  # its p column beside the p against the unreduced
    best="most accurate",
    reading="Ranked by top-1: the most accurate is tested against each other method on the same "
    "images (exact McNemar, p-values Holm-corrected for the number of comparisons, `p vs "
    "best`); those it does not beat at 5% share first place (`1=`, tied).",
)
ACCURACY_METRICS = {  # in the order of the report's and the leaderboard's columns
    "top1": Metric(
        "%",
        higher_is_better=True,
        label="top-1",
        table=True,
        leaderboard=_BY_TOP1,
        over_images=True,
    ),
    # against the unreduced model on the same images
    "delta_top1": Metric(
        "pp",
        higher_is_better=True,
        label="Δ top-1",
        spec="+.2f",
        table=True,
        leaderboard=Shown(),
        over_images=True,
    ),
    # the exact McNemar test of that difference
    "p_value": Metric(
        label="p",
        spec=".3g",
        leaderboard=Shown(reading="`p` is the method against the unreduced model."),
    ),
    "agreement_top1": Metric(
        "%",
        higher_is_better=True,
        label="agreement",
        table=True,
        leaderboard=Shown(),
        over_images=True,
    ),
    "top5": Metric("%", higher_is_better=True, label="top-5", over_images=True),
    "loss": Metric(higher_is_better=False, over_images=True),
    "kl": Metric(higher_is_better=False, label="KL", over_images=True),
    "unreadable_images": Metric(),
}
ACCURACY = MetricGroup(
    "accuracy",
    ACCURACY_METRICS,
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
    """GMACs from any run of the configuration; the MAC reduction and ideal speedup."""
    ratio = c.ideal_speedup
    gmacs = MACS_METRICS["gmacs"]
    return {
        gmacs.header(): fmt(c.cost, gmacs.spec),
        "MACs reduction (%)": fmt(None if ratio is None else 100 * (1 - 1 / ratio), ".1f"),
        "ideal speedup": fmt(ratio, ".2f", "x"),
    }


MACS_METRICS = {
    # the cost budgets are set in
    "gmacs": Metric(
        "GMACs",
        higher_is_better=False,
        label="GMACs",
        spec=".3f",
        leaderboard=Shown(),
        cost="MACs",
    ),
    "gmacs_fvcore": Metric("GMACs", higher_is_better=False),
    "gmacs_single_input": Metric("GMACs", higher_is_better=False),
    "param_count": Metric("M"),
}
MACS = MetricGroup("macs", MACS_METRICS, _measure_macs, _macs_columns, same_everywhere=True)


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
    """The speedup where a run has none paired, marked where its interval holds 1, and the
    share of the ideal speedup it reached, at each batch size."""
    out, declared = {}, THROUGHPUT_METRICS["speedup"]
    ideal = c.ideal_speedup
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
        out[declared.header(bs)] = declared.cell(speedup, mark=tie)
        # How much of the MAC reduction became speed.
        share = None if speedup is None or not ideal else 100 * speedup.value / ideal
        out[f"% of ideal @{bs}"] = fmt(share, ".0f")
    return out


_BY_SPEEDUP = Ranked(
    IntervalOverlap(),
    best="fastest",
    reading="Speed: the fastest at each batch size, and those whose 95% speedup interval "
    "overlaps its interval, tied with it.",
)
THROUGHPUT_METRICS = {  # the batch sizes outermost: img/s and speedup at each
    "samples_per_sec": Metric(
        "img/s", higher_is_better=True, label="img/s", spec=".1f", table=True
    ),
    "speedup": Metric(
        "x",
        higher_is_better=True,
        label="speedup",
        suffix="x",
        table=True,
        leaderboard=_BY_SPEEDUP,
    ),
    "baseline_samples_per_sec": Metric("img/s"),
    "timing_rounds": Metric(),
    "cpu_threads": Metric(),
}
THROUGHPUT = MetricGroup(
    "throughput",
    THROUGHPUT_METRICS,
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
    """The median latency at the smallest batch size timed."""
    if not c.batch_sizes:
        return {}
    small = c.at(c.runs, c.batch_sizes[0])
    p50 = LATENCY_METRICS["latency_p50_ms"]
    return {p50.header(c.batch_sizes[0]): p50.cell(c.estimate(small, "latency_p50_ms"))}


LATENCY_METRICS = {
    "latency_p50_ms": Metric("ms", higher_is_better=False, label="latency p50"),
    "latency_p90_ms": Metric("ms", higher_is_better=False, label="latency p90"),
}
LATENCY = MetricGroup("latency", LATENCY_METRICS, _measure_latency, _latency_columns, timing=True)


def _measure_memory(run: Run) -> dict[str, float]:
    """peak CUDA memory"""
    peak = run.speed().peak_mem_mb
    return {} if peak is None else {"peak_mem_mb": peak}


MEMORY_METRICS = {"peak_mem_mb": Metric("MiB", higher_is_better=False, label="peak memory")}
MEMORY = MetricGroup(
    "memory",
    MEMORY_METRICS,
    _measure_memory,
    None,
    timing=True,
    cuda_only=True,
    paired_timing=True,
)


# Tokens after each block; the fraction of images for which a method's boolean per-image figure
# was true at each reduction block (``<name>_frac_block_<i>``: ppt's ``pooled``).
TOKENS, CHOSEN = "tokens_block_", "*_frac_block_"


def _measure_tokens(run: Run) -> dict[str, float]:
    """tokens after every block; the methods' per-image choices (ppt's pooled fraction) per
    location"""
    return run.data_pass().tokens.metrics()


def _per_block(runs: pd.DataFrame, prefix: str) -> list[tuple[int, str]]:
    """``(block, column)`` of the per-block metric columns with a value, by block."""
    cols = [c for c in runs if c.startswith(prefix) and runs[c].notna().any()]
    return sorted((int(c[len(prefix) :]), c) for c in cols)


def _tokens_columns(c: Cells) -> dict[str, str]:
    """The tokens after the last block, and for each boolean figure the methods report
    (``pooled``) its fraction at each block that has one: ``pooled fraction (block: frac)``."""
    blocks = _per_block(c.runs, TOKENS)
    out = {"tokens out": fmt(c.mean(c.runs, blocks[-1][1]) if blocks else None, ".1f")}
    names = sorted({m[1] for col in c.runs if (m := re.fullmatch(r"(\w+)_frac_block_\d+", col))})
    for name in names:
        per_block = _per_block(c.runs, f"{name}_frac_block_")
        shown = ", ".join(f"{b}: {c.mean(c.runs, col):.2f}" for b, col in per_block)
        out[f"{name} {TOKENS_METRICS[CHOSEN].header()}"] = shown
    return out


TOKENS_METRICS = {
    TOKENS: Metric("tokens"),
    CHOSEN: Metric("", label="fraction (block: frac)", text=True),
}
TOKENS_GROUP = MetricGroup(
    "tokens", TOKENS_METRICS, _measure_tokens, _tokens_columns, needs_data=True
)


def _measure_cost(run: Run) -> dict[str, Estimate | float]:
    """where a forward's time goes: each part's ms, operators, syncs, host time, attention
    kernels (profiled forwards)"""
    return run.cost().metrics()


# Each part's own time per profiled forward (``part_<part>_ms``; on CUDA also its kernels'
# ``part_<part>_device_ms``, see ppt_bench.measure.cost) and the attention kernel of each block
# (``attn_<kernel>_block_<i>``, 1) or, timed compiled or in a CUDA graph, of the forward
# (``attn_<kernel>_calls``).
PARTS, KERNEL = "part_", "attn_"
COST_METRICS = {
    "cost_forward_ms": Metric("ms", higher_is_better=False, label="profiled forward"),
    "cost_host_ms": Metric("ms", higher_is_better=False, label="host time outside operators"),
    "cost_ops": Metric(higher_is_better=False, label="operators", spec=".0f"),
    "cost_syncs": Metric(higher_is_better=False, label="syncs", spec=".0f"),
    "cost_forwards": Metric(label="profiled forwards", spec=".0f"),
    "cost_eager_parts": Metric(label="parts from an eager profile", spec=".0f"),
    PARTS: Metric("ms", higher_is_better=False, label="part"),
    KERNEL: Metric(label="attention kernel", spec=".0f"),
}
COST = MetricGroup("cost", COST_METRICS, _measure_cost, None, timing=True)


for _group in (
    ACCURACY,
    MACS,
    THROUGHPUT,
    LATENCY,
    MEMORY,
    TOKENS_GROUP,
    COST,
):  # in the order the report shows them
    register_metric_group(_group)


__all__ = [
    "Cells",
    "Declared",
    "IntervalOverlap",
    "McNemar",
    "Metric",
    "MetricGroup",
    "Ranked",
    "Run",
    "Shown",
    "cost",
    "declared",
    "fmt",
    "get",
    "groups",
    "headline",
    "mean_columns",
    "names",
    "on_leaderboard",
    "register_metric_group",
    "unit_of",
]
