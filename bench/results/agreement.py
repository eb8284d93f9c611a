"""Whether two runs of the same experiments agree within their intervals.

Calibrated 95% intervals of one quantity, measured twice with the same noise, overlap almost
always (for normal errors, two such intervals miss each other only when the estimates differ by
more than 2 x 1.96 standard errors: under 1% of the time), and one run's estimate falls inside
the other's interval about 83% of the time (a difference of two estimates has sqrt(2) times the
standard error of one: P(|Z| < 1.96 / sqrt(2)) = 0.83). Intervals that cover only the spread
within a run overlap less often and catch the other run's estimate less often than that: this
compares the two, metric by metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# What calibrated 95% intervals of two equally noisy runs give (see the module docstring).
CALIBRATED_INSIDE = 0.83


@dataclass(frozen=True)
class Agreement:
    """Two runs of the same experiments, one metric.

    Attributes:
        rows: the experiments (run ids) both measured with an interval.
        overlap: the share of them whose two intervals overlap.
        inside: the share of estimates inside the other run's interval (both ways).
        width: the median width of the intervals, relative to their estimate.
        missed: the run ids whose intervals do not overlap.
    """

    rows: int
    overlap: float
    inside: float
    width: float
    missed: tuple[str, ...]


def agreement(first: pd.DataFrame, second: pd.DataFrame, metric: str = "speedup") -> Agreement:
    """How two results frames (``read_results``) agree on ``metric``, run by run.

    Runs are matched by run id (the same experiment: model, method, settings, machine, batch
    size...); rows without an interval are left out.
    """
    pick = lambda df: (
        df[(df["metric"] == metric) & df["ci_low"].notna() & (df["status"] == "ok")]
        .drop_duplicates("run_id", keep="last")
        .set_index("run_id")[["value", "ci_low", "ci_high"]]
    )
    both = pick(first).join(pick(second), lsuffix="_a", rsuffix="_b", how="inner")
    if both.empty:
        return Agreement(0, math.nan, math.nan, math.nan, ())
    apart = (both["ci_high_a"] < both["ci_low_b"]) | (both["ci_high_b"] < both["ci_low_a"])
    inside_a = (both["value_a"] >= both["ci_low_b"]) & (both["value_a"] <= both["ci_high_b"])
    inside_b = (both["value_b"] >= both["ci_low_a"]) & (both["value_b"] <= both["ci_high_a"])
    widths = np.concatenate(
        [
            ((both["ci_high_a"] - both["ci_low_a"]) / both["value_a"]).to_numpy(),
            ((both["ci_high_b"] - both["ci_low_b"]) / both["value_b"]).to_numpy(),
        ]
    )
    return Agreement(
        rows=len(both),
        overlap=float(1 - apart.mean()),
        inside=float((inside_a.mean() + inside_b.mean()) / 2),
        width=float(np.median(widths)),
        missed=tuple(both.index[apart]),
    )
