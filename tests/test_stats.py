"""Intervals and paired tests against planted differences, each figure computed independently
here from its textbook formula."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import beta, norm

from ppt_bench.core import stats
from ppt_bench.measure.outcomes import Outcomes
from ppt_bench.results.agreement import agreement


def planted(n: int, only_first: int, only_second: int, both: int) -> tuple[np.ndarray, ...]:
    """Two correctness vectors over ``n`` images: ``both`` right in both, then images only the
    first gets right, then images only the second gets right, the rest wrong in both."""
    first, second = np.zeros(n, bool), np.zeros(n, bool)
    first[:both] = second[:both] = True
    first[both : both + only_first] = True
    second[both + only_first : both + only_first + only_second] = True
    return first, second


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar: twice the smaller binomial tail of b out of b + c at 1/2."""
    m = b + c
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def clopper_pearson(k: int, m: int) -> tuple[float, float]:
    low = 0.0 if k == 0 else beta.ppf(0.025, k, m - k + 1)
    high = 1.0 if k == m else beta.ppf(0.975, k + 1, m - k)
    return low, high


@pytest.mark.parametrize(
    ("n", "b", "c"), [(360, 4, 0), (360, 10, 0), (1000, 30, 12), (500, 7, 9), (200, 0, 0)]
)
def test_paired_difference_and_mcnemar_match_their_formulas(n, b, c):
    first, second = planted(n, b, c, both=n // 2)
    result = stats.paired(first, second)
    assert (result.only_first, result.only_second) == (b, c)
    assert result.delta.value == pytest.approx(100 * (b - c) / n)
    assert result.p_value == pytest.approx(exact_mcnemar(b, c), rel=1e-9)
    if b + c == 0:  # no image differs: no difference, and nothing to test
        assert result.delta == (0.0, 0.0, 0.0) and result.p_value == 1.0
        return
    low, high = clopper_pearson(b, b + c)
    m = b + c
    assert result.delta.low == pytest.approx(100 * m * (2 * low - 1) / n, abs=1e-9)
    assert result.delta.high == pytest.approx(100 * m * (2 * high - 1) / n, abs=1e-9)
    # The interval excludes 0 exactly when the test rejects at 5%.
    assert (result.delta.low > 0 or result.delta.high < 0) == (result.p_value < 0.05)


def test_planted_differences_are_significant_only_when_large_enough():
    assert not stats.paired(*planted(360, 4, 0, 300)).significant  # p = 1/8
    assert stats.paired(*planted(360, 10, 0, 300)).significant  # p = 1/512
    assert stats.paired(*planted(360, 0, 10, 300)).delta.high < 0  # the other way round


def test_wilson_interval_matches_its_formula():
    hits = np.r_[np.ones(347, bool), np.zeros(13, bool)]
    n, p, z = hits.size, 347 / 360, norm.ppf(0.975)
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    est = stats.proportion(hits)
    assert est.value == pytest.approx(100 * p)
    assert (est.low, est.high) == pytest.approx((100 * (centre - half), 100 * (centre + half)))


def test_median_interval_is_between_order_statistics_with_95_percent_coverage():
    values = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 8.0, 6.0])
    est = stats.median(values)
    assert est.value == 5.0
    # n = 9: the 2nd and 8th smallest cover the median with probability 1 - 2 * P(Bin <= 1).
    assert (est.low, est.high) == (2.0, 8.0)
    coverage = 1 - 2 * sum(math.comb(9, k) for k in range(2)) / 2**9
    assert coverage >= 0.95
    few = stats.median(values[:5])  # five rounds are too few for a 95% interval
    assert few.value == 3.0 and math.isnan(few.low) and math.isnan(few.high)


def test_mean_interval_is_students_t():
    values = np.array([0.1, 0.4, 0.2, 0.5, 0.3])
    est = stats.mean(values)
    half = 2.7764451051977987 * values.std(ddof=1) / math.sqrt(5)  # t(0.975, 4)
    assert (est.low, est.high) == pytest.approx((0.3 - half, 0.3 + half))


def test_outcomes_give_the_run_and_its_paired_figures():
    label = np.arange(20) % 5
    pred = label.copy()
    pred[:3] = (pred[:3] + 1) % 5  # 3 wrong
    ref_pred = label.copy()
    ref_pred[10] = (ref_pred[10] + 1) % 5  # the reference gets image 10 wrong
    out = Outcomes(
        label=label,
        pred=pred,
        top5=np.ones(20, bool),
        loss=np.full(20, 0.5, np.float32),
        ref_pred=ref_pred,
        kl=np.zeros(20, np.float32),
    )
    est = out.estimates()
    assert est["top1"].value == pytest.approx(85.0)
    assert est["agreement_top1"].value == pytest.approx(80.0)  # 3 + 1 images differ
    versus = out.against_reference()
    assert (versus.only_first, versus.only_second) == (1, 3)
    assert versus.delta.value == pytest.approx(-10.0)
    again = Outcomes.from_bytes(out.to_bytes())
    assert all(np.array_equal(getattr(again, f), getattr(out, f)) for f in ("label", "pred", "kl"))


def test_two_runs_agree_by_their_intervals():
    """Runs matched by run id: the share of overlapping intervals, of estimates inside the other
    run's interval, and the intervals' median relative width."""

    def frame(rows):
        return pd.DataFrame(
            [
                {"run_id": r, "metric": "speedup", "value": v, "ci_low": lo, "ci_high": hi,
                 "status": "ok"}
                for r, v, lo, hi in rows
            ]
        )  # fmt: skip

    first = frame([("a", 1.0, 0.9, 1.1), ("b", 2.0, 1.9, 2.1), ("c", 1.5, 1.4, 1.6)])
    second = frame([("a", 1.05, 1.0, 1.1), ("b", 2.5, 2.4, 2.6), ("d", 1.0, 0.9, 1.1)])
    found = agreement(first, second)
    assert found.rows == 2 and found.missed == ("b",)
    assert found.overlap == 0.5
    assert found.inside == 0.5  # a's estimates lie inside each other's interval, b's do not
    assert found.width == pytest.approx(np.median([0.2, 0.1, 0.1 / 1.05, 0.2 / 2.5]))
