"""Leaderboards: which method wins at each budget of a sweep run at budgets (``--budget``).

Per model and budget, one row per method at its resolved setting, with the columns the metric
groups declare for the leaderboard (:attr:`~ppt_bench.measure.metrics.Metric.leaderboard`): the
cost the method achieved (GMACs) and its share first, then, in the groups' order, each metric
shown (Δ top-1 against the unreduced model with its interval and p, agreement, ...) or ranked.
No metric is named here; each ranked metric declares its direction and its paired test:

- :class:`~ppt_bench.measure.metrics.McNemar` (top-1): the rows are ranked by the metric; the
  best is compared with every other on the same images by the exact McNemar test of the declared
  per-image outcome (:func:`ppt_bench.core.stats.paired`), the p-values corrected for the number
  of comparisons by Holm's step-down method; the methods it does not beat share first place and
  are marked tied.
- :class:`~ppt_bench.measure.metrics.IntervalOverlap` (the paired speedup, at each batch size):
  a method whose 95% interval overlaps the best's shares first place (speedups are each paired
  with the unreduced model, not with each other, so overlap is the comparison they allow); the
  best and those tied with it are marked in their cells.

One generated sentence per budget says what the tests show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tabulate import tabulate

from ppt_bench.core import stats
from ppt_bench.core.stats import ALPHA, Estimate
from ppt_bench.measure import metrics
from ppt_bench.measure.cells import Cells, fmt
from ppt_bench.measure.metrics import Declared, IntervalOverlap, McNemar, Ranked
from ppt_bench.results.records import CONTEXT, format_params, varied

if TYPE_CHECKING:
    import pandas as pd

    from ppt_bench.measure.outcomes import Outcomes

TIED = "tied"
P_BEST = "p vs best (Holm)"  # the column of the McNemar ranking: the best against each method
SHARE = "share"  # the budget's column: the share of the unreduced model's cost achieved


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input's order: the ``i``-th smallest of ``m`` is
    multiplied by ``m - i`` (``i`` from 0), made non-decreasing, capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    m, running, out = len(p_values), 0.0, [math.nan] * len(p_values)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


@dataclass
class Entry:
    """One method at one budget.

    Attributes:
        score: its figure of the metric the rows are ranked by (:func:`metrics.headline`).
        cost: its mean cost (the metric declared ``cost``).
        share: the share of the unreduced model's cost it achieved (the budget's column).
    """

    method: str
    params: str
    score: Estimate | None
    cost: float | None
    share: float | None
    runs: pd.DataFrame
    run_id: str | None = None
    p_best: float = math.nan  # Holm-adjusted p of the best against this one
    p_raw: float = math.nan
    tied: bool = False
    rank: int = 0


def _entries(runs: pd.DataFrame, outcomes: Mapping[str, Outcomes]) -> list[Entry]:
    headline, cost = metrics.headline(), metrics.cost()
    entries = []
    for (method, params), group in runs.groupby(["method", "params"], sort=False):
        score = None if headline is None else Cells.estimate(group, headline.name)
        with_outcomes = [r for r in group["run_id"] if r in outcomes]
        entries.append(
            Entry(
                method,
                params,
                score,
                None if cost is None else Cells.mean(group, cost.name),
                Cells.mean(group, "budget_share"),
                group,
                with_outcomes[0] if with_outcomes else None,
            )
        )
    return entries


def _test(d: Declared) -> McNemar | IntervalOverlap | None:
    """The paired test a metric is ranked by, None for one only shown."""
    board = d.metric.leaderboard
    return board.test if isinstance(board, Ranked) else None


def rank_rows(entries: list[Entry], outcomes: Mapping[str, Outcomes]) -> list[Entry]:
    """Rank by the headline metric's figure (:attr:`Entry.score`), in its direction; the best
    against each other by McNemar on the declared per-image outcome, Holm-corrected; the ones it
    does not beat (or that cannot be tested: no per-image outcomes on the same images) tie for
    first."""
    headline = metrics.headline()
    if headline is None:
        return entries
    outcome = headline.metric.leaderboard.test.outcome  # headline() is ranked by McNemar
    sign = -1 if headline.metric.higher_is_better else 1
    scored = [e for e in entries if e.score is not None and e.score.value == e.score.value]
    scored.sort(key=lambda e: sign * e.score.value)
    if not scored:
        return entries
    best = scored[0]
    best.tied, best.rank = True, 1
    others = scored[1:]
    raw = []
    for e in others:
        a, b = outcomes.get(best.run_id or ""), outcomes.get(e.run_id or "")
        if a is None or b is None or not np.array_equal(a.label, b.label):
            raw.append(math.nan)
        else:
            raw.append(stats.paired(getattr(a, outcome), getattr(b, outcome)).p_value)
    testable = [i for i, p in enumerate(raw) if p == p]
    adjusted = holm([raw[i] for i in testable])
    for i, e in enumerate(others):
        e.p_raw = raw[i]
    for i, p in zip(testable, adjusted, strict=True):
        others[i].p_best = p
    for position, e in enumerate(others, start=2):
        e.tied = not e.p_best < ALPHA  # untested (NaN) counts as not beaten
        e.rank = 1 if e.tied else position
    return scored + [e for e in entries if e not in scored]


def _figure(entry: Entry, metric: str, batch_size: int | None) -> Estimate | None:
    runs = entry.runs if batch_size is None else Cells.at(entry.runs, batch_size)
    return Cells.estimate(runs, metric)


def _sizes(d: Declared, batch_sizes: list[int]) -> list[int | None]:
    """The batch sizes a metric is shown at: each timed one for a group that times."""
    return list(batch_sizes) if d.group.timing else [None]


def best_and_ties(
    entries: list[Entry], d: Declared, batch_size: int | None
) -> tuple[Entry | None, list[Entry]]:
    """The best by a metric ranked by interval overlap (at a batch size, for a group that times),
    in its direction, and those whose interval overlaps its interval."""
    measured = [(e, s) for e in entries if (s := _figure(e, d.name, batch_size)) is not None]
    if not measured:
        return None, []
    pick = max if d.metric.higher_is_better else min
    best, top = pick(measured, key=lambda es: es[1].value)
    ties = [
        e
        for e, s in measured
        if e is not best
        and top.low == top.low
        and s.high == s.high
        and s.high >= top.low
        and s.low <= top.high
    ]
    return best, ties


def _by_overlap(batch_sizes: list[int]) -> list[tuple[Declared, int | None]]:
    """Each metric ranked by interval overlap, at each batch size it is shown at."""
    return [
        (d, bs)
        for d in metrics.on_leaderboard()
        if isinstance(_test(d), IntervalOverlap)
        for bs in _sizes(d, batch_sizes)
    ]


def _names(entries: Sequence[Entry]) -> str:
    names = [e.method for e in entries]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def sentence(
    budget: str,
    target: float | None,
    entries: list[Entry],
    batch_sizes: list[int],
    context: str = "",
) -> str:
    """What the tests show at one budget (in one context, such as ``compile default``, where the
    sweep has several), in one sentence (two with a metric ranked by interval overlap, such as
    the speedup)."""
    ranked = [e for e in entries if e.rank]
    headline = metrics.headline()
    at = f"At {budget}" + (f" ({target:.3g} GMACs)" if target else "")  # a budget's target
    at += f" with {context}" if context else ""
    if headline is None or not ranked:
        what = "a ranked metric" if headline is None else headline.metric.label
        return f"{at} no method measured {what}."
    best = ranked[0]
    tied = [e for e in ranked[1:] if e.tied]
    beaten = [e for e in ranked[1:] if not e.tied]
    board = headline.metric.leaderboard
    text = f"{at}, {best.method} is the {board.best} ({headline.metric.figure(best.score.value)})"
    if tied:
        text += (
            f"; {_names(tied)} {'is' if len(tied) == 1 else 'are'} not significantly behind it "
            "(exact McNemar on the same images, Holm-corrected p >= 0.05) and "
            f"{'shares' if len(tied) == 1 else 'share'} first place"
        )
    if beaten:
        text += f"; it beats the other {len(beaten)} significantly"
    text += "."
    for d, bs in _by_overlap(batch_sizes):
        top, ties = best_and_ties(entries, d, bs)
        if top is None:
            continue
        s = _figure(top, d.name, bs)
        word = d.metric.leaderboard.best
        where = "" if bs is None else f" at batch size {bs}"
        text += f" {word[:1].upper()}{word[1:]}{where}: {top.method} ({d.metric.figure(s.value)})"
        text += f", with {_names(ties)} within its interval." if ties else "."
    return text


def leaderboard_table(entries: list[Entry], batch_sizes: list[int]) -> str:
    """The ranked markdown table of one budget: rank, method and setting, then the leaderboard's
    metrics (:func:`~ppt_bench.measure.metrics.on_leaderboard`), the budget's share after the
    cost and the McNemar ranking's p column after the metric it names."""
    headline, shown = metrics.headline(), metrics.on_leaderboard()
    marked = {(d.name, bs): best_and_ties(entries, d, bs) for d, bs in _by_overlap(batch_sizes)}
    p_after = None if headline is None else headline.metric.leaderboard.test.after or headline.name
    shared = sum(e.tied for e in entries) > 1  # first place is shared
    rows = []
    for i, e in enumerate(entries):
        rank = "" if not e.rank else f"{e.rank}" + ("=" if e.tied and shared else "")
        row = {
            "rank": rank,
            "method": e.method + (f" ({TIED})" if e.tied and i > 0 else ""),
            "setting": format_params(e.params),
        }
        share = "" if e.share is None else f"{e.share:.1%}"
        p_best = "" if e.p_best != e.p_best else f"{e.p_best:.3g}"
        if not any(d.metric.cost for d in shown):
            row[SHARE] = share
        for d in shown:
            for bs in _sizes(d, batch_sizes):
                row[d.metric.header(bs)] = _cell(e, d, bs, headline, marked)
            if d.metric.cost:  # what the method achieved at the budget
                row[SHARE] = share
            if d.name == p_after:
                row[P_BEST] = p_best
        if p_after is not None:
            row.setdefault(
                P_BEST, p_best
            )  # after the rest where the metric it follows is not shown
        rows.append(row)
    header = list(rows[0]) if rows else []
    header = [h for h in header if any(r[h] for r in rows) or h in ("rank", "method")]
    table = [[r[h] for h in header] for r in rows]
    return tabulate(table, header, tablefmt="github", disable_numparse=True)


def _cell(
    e: Entry,
    d: Declared,
    batch_size: int | None,
    headline: Declared | None,
    marked: Mapping[tuple[str, int | None], tuple[Entry | None, list[Entry]]],
) -> str:
    """One entry's cell of a leaderboard metric: the cost's mean, the headline's score, or the
    figure with its interval, marked best or tied for a metric ranked by interval overlap."""
    if d.metric.cost:
        return fmt(e.cost, d.metric.spec, d.metric.suffix)
    if headline is not None and d.name == headline.name:
        return d.metric.cell(e.score)
    figure = _figure(e, d.name, batch_size)
    cell = d.metric.cell(figure)
    if (d.name, batch_size) not in marked or figure is None:
        return cell
    best, ties = marked[d.name, batch_size]
    word = d.metric.leaderboard.best
    return cell + (f" ({word})" if e is best else (f" ({TIED})" if e in ties else ""))


def budget_sections(
    runs: pd.DataFrame, outcomes: Mapping[str, Outcomes], batch_sizes: list[int]
) -> list[str]:
    """Markdown lines of every budget's leaderboard of one model (empty without budgets): one
    per budget and context (device, dtype, compile mode, data, weights) where the sweep has
    several, since runs measured otherwise are never averaged together."""
    if "budget" not in runs:
        return []
    at = runs[runs["budget"].fillna("").astype(str) != ""]
    if at.empty:
        return []
    contexts = varied(at, CONTEXT)
    lines = []
    targets = at.groupby("budget")["budget_gmacs"].mean() if "budget_gmacs" in at else None
    order = sorted(
        at["budget"].unique(), key=lambda b: -(targets.get(b, 0) if targets is not None else 0)
    )
    for budget in order:
        group = at[at["budget"] == budget]
        target = None if targets is None else float(targets.get(budget, math.nan))
        target = target if target == target else None
        parts = group.groupby(contexts, sort=False, dropna=False) if contexts else [((), group)]
        for key, part in parts:
            context = ", ".join(f"{c} {v}" for c, v in zip(contexts, key, strict=True))
            entries = rank_rows(_entries(part, outcomes), outcomes)
            lines += [
                f"### At {budget}"
                + (f" ({target:.3g} GMACs)" if target else "")
                + (f", {context}" if context else ""),
                "",
                sentence(budget, target, entries, batch_sizes, context),
                "",
                leaderboard_table(entries, batch_sizes),
                "",
            ]
    return lines


def how_to_read() -> str:
    """The paragraph above the leaderboards: what the budget's columns are, then the reading
    each leaderboard metric declares, in the leaderboard's order."""
    cost = metrics.cost()
    achieved = f"`{cost.metric.header()}` and `{SHARE}` are" if cost else f"`{SHARE}` is"
    readings = [d.metric.leaderboard.reading for d in metrics.on_leaderboard()]
    return " ".join(
        [
            "Each method runs at the setting of its knob that meets the budget (`ppt-bench run "
            f"--budget`): {achieved} what it achieved.",
            *(r for r in readings if r),
        ]
    )


__all__ = [
    "Entry",
    "best_and_ties",
    "budget_sections",
    "holm",
    "how_to_read",
    "leaderboard_table",
    "rank_rows",
    "sentence",
]
