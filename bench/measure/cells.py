"""Report cells: what a report column sees of one configuration, and how a figure and its
interval are written in a cell. Metric groups build their report columns from these."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ppt_bench.core.stats import Estimate

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Cells:
    """What a report column sees: one configuration's runs and the matching baseline's.

    Attributes:
        runs: the configuration's runs (one row per run, one column per metric).
        base: the baseline runs of the same model, device, dtype, compile mode and data.
        batch_sizes: the batch sizes speed was measured at, ascending.
        cost: the mean of the metric budgets are set in (declared ``cost``: GMACs) of this
            method and parameters, from any run that measured it.
        base_cost: the same for the baseline.
    """

    runs: pd.DataFrame
    base: pd.DataFrame
    batch_sizes: list[int]
    cost: float | None = None
    base_cost: float | None = None

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
        """The baseline's cost over this configuration's: the speedup if time followed the cost
        (MACs)."""
        if not self.cost or self.base_cost is None:
            return None
        return self.base_cost / self.cost


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
