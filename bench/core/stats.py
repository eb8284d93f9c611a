"""95% intervals and paired tests, from scipy.stats.

Every estimate a run records is an :class:`Estimate`: the value and its 95% interval.

- A proportion (top-1, top-5, agreement over n images): Wilson score interval
  (``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``).
- A mean over images (loss, KL): Student's t interval (``scipy.stats.ttest_1samp``).
- A median over timing rounds (images/s, a speedup): the distribution-free interval between two
  order statistics (``scipy.stats.quantile_test``); it needs at least 6 rounds, fewer give no
  interval.
- Two models on the same images (a method against the unreduced model, or two methods): the
  exact McNemar test, a two-sided binomial test of the split of the images that exactly one of
  them classifies correctly (``scipy.stats.binomtest``), and the difference in top-1 with the
  exact conditional interval that goes with it: the Clopper-Pearson interval of that split,
  scaled to percentage points. The interval excludes 0 exactly when the p-value is below 0.05,
  so the two never disagree (a t interval of the per-image differences can exclude 0 at
  p = 0.125, when 4 of 4 differing images go one way).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


class Estimate(NamedTuple):
    """A figure with its 95% interval (NaN bounds: no interval could be given)."""

    value: float
    low: float = math.nan
    high: float = math.nan


def _scipy_stats() -> Any:
    """``scipy.stats``, imported on first use: it takes seconds to import, and the commands
    that compute no interval (``--help``, ``list``) should not wait for it."""
    from scipy import stats  # imported here (see above)

    return stats


def proportion(hits: np.ndarray) -> Estimate:
    """The share of true entries of a bool vector in %, with its Wilson interval."""
    n, k = int(hits.size), int(np.count_nonzero(hits))
    if n == 0:
        return Estimate(math.nan)
    ci = _scipy_stats().binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return Estimate(100.0 * k / n, 100.0 * ci.low, 100.0 * ci.high)


def mean(values: np.ndarray) -> Estimate:
    """The mean with its t interval (a constant vector: the value itself, no width)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Estimate(math.nan)
    m = float(values.mean())
    if values.size == 1:
        return Estimate(m)
    if np.all(values == values[0]):
        return Estimate(m, m, m)
    ci = _scipy_stats().ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
    return Estimate(m, float(ci.low), float(ci.high))


def quantile(values: np.ndarray, q: float = 0.5) -> Estimate:
    """The ``q`` quantile with its order-statistic interval (NaN bounds when there are too few
    values for a 95% interval: fewer than 6 for the median)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Estimate(math.nan)
    value = float(np.quantile(values, q))
    if values.size < 2:
        return Estimate(value)
    ci = _scipy_stats().quantile_test(values, q=value, p=q).confidence_interval(CONFIDENCE)
    low, high = float(ci.low), float(ci.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        return Estimate(value)
    return Estimate(value, low, high)


def median(values: np.ndarray) -> Estimate:
    return quantile(values, 0.5)


class Paired(NamedTuple):
    """Two models compared on the same images.

    Attributes:
        delta: top-1 of the first minus top-1 of the second, in percentage points, with the
            paired 95% interval.
        p_value: exact McNemar test of equal accuracy.
        only_first: images only the first classifies correctly.
        only_second: images only the second classifies correctly.
    """

    delta: Estimate
    p_value: float
    only_first: int
    only_second: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def paired(first: np.ndarray, second: np.ndarray) -> Paired:
    """Compare two bool vectors of per-image correctness on the same images."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape:
        raise ValueError(f"paired outcomes cover different images: {first.shape} {second.shape}")
    n = first.size
    b = int(np.count_nonzero(first & ~second))
    c = int(np.count_nonzero(~first & second))
    if n == 0:
        return Paired(Estimate(math.nan), math.nan, 0, 0)
    m = b + c  # the images on which the two differ
    d = 100.0 * (b - c) / n
    if m == 0:
        return Paired(Estimate(d, d, d), 1.0, b, c)
    test = _scipy_stats().binomtest(b, m, 0.5)
    share = test.proportion_ci(confidence_level=CONFIDENCE, method="exact")
    # b - c = m (2 pi - 1) for the share pi of the differing images that go the first's way.
    low, high = (100.0 * m * (2 * q - 1) / n for q in (share.low, share.high))
    return Paired(Estimate(d, low, high), float(test.pvalue), b, c)
