"""Leaderboards: which method wins at each budget of a sweep run at budgets (``--budget``).

Per model and budget, one row per method at its resolved setting: achieved GMACs and share,
top-1, Δ top-1 against the unreduced model with its interval and p, agreement, and the paired
speedup at each batch size. Methods are ranked by top-1. The most accurate is compared with
every other on the same images by the exact McNemar test (:func:`ppt_bench.core.stats.paired`), the
p-values corrected for the number of comparisons by Holm's step-down method; the methods it
does not beat share first place and are marked tied. Speed is ranked the same way per batch
size by the paired speedups: a method whose 95% interval overlaps the fastest's shares first
place (speedups are each paired with the unreduced model, not with each other, so overlap is
the comparison they allow). One generated sentence per budget says what the tests show.
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
from ppt_bench.measure.cells import Cells, fmt_ci
from ppt_bench.results.records import format_params

if TYPE_CHECKING:
    import pandas as pd

    from ppt_bench.measure.outcomes import Outcomes

TIED = "tied"


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
    """One method at one budget."""

    method: str
    params: str
    top1: Estimate | None
    gmacs: float | None
    share: float | None
    runs: pd.DataFrame
    run_id: str | None = None
    p_best: float = math.nan  # Holm-adjusted p of the best against this one
    p_raw: float = math.nan
    tied: bool = False
    rank: int = 0


def _entries(runs: pd.DataFrame, outcomes: Mapping[str, Outcomes]) -> list[Entry]:
    entries = []
    for (method, params), group in runs.groupby(["method", "params"], sort=False):
        top1 = Cells.estimate(group, "top1")
        with_outcomes = [r for r in group["run_id"] if r in outcomes]
        gmacs = Cells.mean(group, "gmacs")
        share = Cells.mean(group, "budget_share")
        entries.append(
            Entry(
                method,
                params,
                top1,
                gmacs,
                share,
                group,
                with_outcomes[0] if with_outcomes else None,
            )
        )
    return entries


def rank_accuracy(entries: list[Entry], outcomes: Mapping[str, Outcomes]) -> list[Entry]:
    """Rank by top-1; the best against each other by McNemar, Holm-corrected; the ones it does
    not beat (or that cannot be tested: no per-image outcomes on the same images) tie for first.
    """
    scored = [e for e in entries if e.top1 is not None and e.top1.value == e.top1.value]
    scored.sort(key=lambda e: -e.top1.value)
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
            raw.append(stats.paired(a.correct, b.correct).p_value)
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


def _speedup(entry: Entry, batch_size: int) -> Estimate | None:
    return Cells.estimate(Cells.at(entry.runs, batch_size), "speedup")


def fastest(entries: list[Entry], batch_size: int) -> tuple[Entry | None, list[Entry]]:
    """The fastest at a batch size, and those whose speedup interval overlaps its interval."""
    timed = [(e, s) for e in entries if (s := _speedup(e, batch_size)) is not None]
    if not timed:
        return None, []
    best, top = max(timed, key=lambda es: es[1].value)
    ties = [
        e
        for e, s in timed
        if e is not best
        and top.low == top.low
        and s.high == s.high
        and s.high >= top.low
        and s.low <= top.high
    ]
    return best, ties


def _names(entries: Sequence[Entry]) -> str:
    names = [e.method for e in entries]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def sentence(
    budget: str, target: float | None, entries: list[Entry], batch_sizes: list[int]
) -> str:
    """What the tests show at one budget, in one sentence (two with speed)."""
    ranked = [e for e in entries if e.rank]
    at = f"At {budget}" + (f" ({target:.3g} GMACs)" if target else "")
    if not ranked:
        return f"{at} no method measured top-1."
    best = ranked[0]
    tied = [e for e in ranked[1:] if e.tied]
    beaten = [e for e in ranked[1:] if not e.tied]
    text = f"{at}, {best.method} is the most accurate ({best.top1.value:.2f}%)"
    if tied:
        text += (
            f"; {_names(tied)} {'is' if len(tied) == 1 else 'are'} not significantly behind it "
            "(exact McNemar on the same images, Holm-corrected p >= 0.05) and "
            f"{'shares' if len(tied) == 1 else 'share'} first place"
        )
    if beaten:
        text += f"; it beats the other {len(beaten)} significantly"
    text += "."
    for bs in batch_sizes:
        quick, ties = fastest(entries, bs)
        if quick is None:
            continue
        s = _speedup(quick, bs)
        text += f" Fastest at batch size {bs}: {quick.method} ({s.value:.2f}x)"
        text += f", with {_names(ties)} within its interval." if ties else "."
    return text


def leaderboard_table(entries: list[Entry], batch_sizes: list[int]) -> str:
    """The ranked markdown table of one budget."""
    speed_first = {bs: fastest(entries, bs) for bs in batch_sizes}
    shared = sum(e.tied for e in entries) > 1  # first place is shared
    rows = []
    for i, e in enumerate(entries):
        delta = Cells.estimate(e.runs, "delta_top1")
        p = Cells.mean(e.runs, "p_value")
        rank = "" if not e.rank else f"{e.rank}" + ("=" if e.tied and shared else "")
        row = {
            "rank": rank,
            "method": e.method + (f" ({TIED})" if e.tied and i > 0 else ""),
            "setting": format_params(e.params),
            "GMACs": "" if e.gmacs is None else f"{e.gmacs:.3f}",
            "share": "" if e.share is None else f"{e.share:.1%}",
            "top-1 (%)": fmt_ci(e.top1, ".2f"),
            "Δ top-1 (pp)": fmt_ci(delta, "+.2f"),
            "p": "" if p is None else f"{p:.3g}",
            "p vs best (Holm)": "" if e.p_best != e.p_best else f"{e.p_best:.3g}",
            "agreement (%)": fmt_ci(Cells.estimate(e.runs, "agreement_top1"), ".2f"),
        }
        for bs in batch_sizes:
            best, ties = speed_first[bs]
            s = _speedup(e, bs)
            mark = " (fastest)" if e is best else (f" ({TIED})" if e in ties else "")
            row[f"speedup @{bs}"] = fmt_ci(s, ".2f", "x") + (mark if s is not None else "")
        rows.append(row)
    header = list(rows[0]) if rows else []
    header = [h for h in header if any(r[h] for r in rows) or h in ("rank", "method")]
    table = [[r[h] for h in header] for r in rows]
    return tabulate(table, header, tablefmt="github", disable_numparse=True)


def budget_sections(
    runs: pd.DataFrame, outcomes: Mapping[str, Outcomes], batch_sizes: list[int]
) -> list[str]:
    """Markdown lines of every budget's leaderboard of one model (empty without budgets)."""
    if "budget" not in runs:
        return []
    at = runs[runs["budget"].fillna("").astype(str) != ""]
    if at.empty:
        return []
    lines = []
    targets = at.groupby("budget")["budget_gmacs"].mean() if "budget_gmacs" in at else None
    order = sorted(
        at["budget"].unique(), key=lambda b: -(targets.get(b, 0) if targets is not None else 0)
    )
    for budget in order:
        group = at[at["budget"] == budget]
        entries = rank_accuracy(_entries(group, outcomes), outcomes)
        target = None if targets is None else float(targets.get(budget, math.nan))
        target = target if target == target else None
        lines += [
            f"### At {budget}" + (f" ({target:.3g} GMACs)" if target else ""),
            "",
            sentence(budget, target, entries, batch_sizes),
            "",
            leaderboard_table(entries, batch_sizes),
            "",
        ]
    return lines


HOW_TO_READ = (
    "Each method runs at the setting of its knob that meets the budget (`ppt-bench run "
    "--budget`): `GMACs` and `share` are what it achieved. Ranked by top-1: the most accurate "
    "is tested against each other method on the same images (exact McNemar, p-values "
    "Holm-corrected for the number of comparisons, `p vs best`); those it does not beat at 5% "
    "share first place (`1=`, tied). `p` is the method against the unreduced model. Speed: "
    "the fastest at each batch size, and those whose 95% speedup interval overlaps its "
    "interval, tied with it."
)

__all__ = ["budget_sections", "fastest", "holm", "leaderboard_table", "rank_accuracy", "sentence"]
