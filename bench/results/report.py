"""Comparison reports: markdown tables and PNG plots generated from one or more results CSVs.

Per model, one table row per configuration (method, parameters, and device, dtype, compile or
dataset where those vary), compared against the baseline of the same configuration, with the
columns the metric groups declare (:mod:`ppt_bench.measure.metrics`: top-1 and its delta,
agreement, GMACs and their reduction, the ideal speedup from MACs, images/s and the measured
speedup at each batch size, ppt's pooled fraction per location, ...). Then the headline metric
at equal cost (or the leaderboards of a sweep at budgets), the runs that failed, the plots, and
where every number came from. No metric is named here: which one is the cost, which one the
methods are compared by, and which way is better come from the groups' declarations.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from tabulate import tabulate

from ppt_bench.core import stats
from ppt_bench.core.errors import UserError, check_output_path
from ppt_bench.core.stats import Estimate
from ppt_bench.measure import metrics
from ppt_bench.measure.cells import NOT_SIGNIFICANT, Cells, fmt
from ppt_bench.measure.outcomes import Outcomes, RunStore
from ppt_bench.results import breakdown, leaderboard
from ppt_bench.results.records import (
    BUDGET_COLUMNS,
    CONTEXT,
    IDENTITY_COLUMNS,
    format_params,
    read_results,
    varied,
)

if TYPE_CHECKING:
    import pandas as pd

RUN_COLUMNS = ("run_id", "model", "method", "params", "batch_size", "device", "dtype", "compile")
WHERE = (
    "machine",
    "device_name",
    "device",
    "dtype",
    "compile",
    "torch_version",
    "timm_version",
    "ppt_bench_version",
    "git_sha",
)
TITLE = "# ppt-bench report: "  # the first line of every report


def _is_text(header: str) -> bool:
    """Whether a table column holds text (aligned left): the run's, and those of the metrics
    declared ``text``, named by their header or, for a name pattern (``*_frac_block_``), ending
    in it."""
    declared = [d.metric.header() for d in metrics.declared() if d.metric.text]
    return header in {"method", "params", *CONTEXT} or any(
        header == h or header.endswith(f" {h}") for h in declared
    )


@dataclass(frozen=True)
class Report:
    """A written report: the markdown file and the plots next to it."""

    markdown: Path
    plots: tuple[Path, ...]


def tidy_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split results into one wide row per ``ok`` run and the failed runs that never succeeded.

    The wide frame has a column per metric, and ``low:<metric>`` / ``high:<metric>`` for the
    bounds of its 95% interval where the rows give one. A run recorded more than once (a rerun,
    or the same run in two CSVs) keeps its last value of each metric; a failed run that later
    succeeded is not listed as failed.
    """
    import pandas as pd  # imported here: a second or more; `ppt-bench --help` waits for none

    df = df.fillna(
        {"params": "{}", "error": "", "dataset": "", **dict.fromkeys(IDENTITY_COLUMNS, "")}
    )
    df["seed"] = df["seed"].astype(str).str.removesuffix(".0")
    df["compile"] = df["compile"].astype(str).replace({"True": "default", "False": "none"})
    ok = df[df["status"] == "ok"]
    failed = df[(df["status"] != "ok") & ~df["run_id"].isin(ok["run_id"])]
    failed = failed.drop_duplicates("run_id", keep="last")
    info = ok.drop_duplicates("run_id", keep="last").set_index("run_id")
    last = ok.drop_duplicates(["run_id", "metric"], keep="last")
    values = last.pivot(index="run_id", columns="metric", values="value")
    bounds = [
        last.pivot(index="run_id", columns="metric", values=f"ci_{bound}").add_prefix(f"{bound}:")
        for bound in ("low", "high")
    ]
    bounds = [b.dropna(axis=1, how="all") for b in bounds]
    keep = [c for c in (*RUN_COLUMNS[1:], *CONTEXT, "n_images", *BUDGET_COLUMNS) if c in info]
    keep = list(dict.fromkeys(keep))
    runs = pd.concat([info[keep], values, *bounds], axis=1).reset_index()
    return runs, failed


def model_table(runs: pd.DataFrame) -> str:
    """The markdown table comparing every configuration of one model with its baseline.

    Its columns after the method, parameters and varied context are those of each metric group
    (:meth:`~ppt_bench.measure.metrics.MetricGroup.columns`), in the groups' order; a column with
    no value in any row is left out. Rows are sorted by cost, the costliest first.
    """
    costs = _cost_by_config(runs)
    runs = _without_cost_only(runs)
    context = varied(runs, CONTEXT)
    batch_sizes = _timed_batch_sizes(runs)
    groups = runs.groupby(["method", "params", *CONTEXT], sort=False, dropna=False)
    rows = []
    for (method, params, *ctx), group in groups:
        _check_one_image_count(group)
        base = _baseline(runs, dict(zip(CONTEXT, ctx, strict=True)))
        cost = costs.get((method, params))
        cells = Cells(group, base, batch_sizes, cost, costs.get(("baseline", "{}")))
        row = {"method": method, "params": format_params(params)}
        row.update({c: str(v) for c, v in zip(CONTEXT, ctx, strict=True) if c in context})
        for metric_group in metrics.groups().values():
            row.update(metric_group.columns(cells))
        rows.append((method != "baseline", method, -(cost or 0), row))
    rows = [row for *_, row in sorted(rows, key=lambda r: r[:3])]
    header = list(dict.fromkeys(h for r in rows for h in r))
    keep = ("method", "params")
    header = [h for h in header if h in keep or any(r.get(h, "") != "" for r in rows)]
    align = ["left" if _is_text(h) else "right" for h in header]
    table = [[r.get(h, "") for h in header] for r in rows]
    return tabulate(table, header, tablefmt="github", disable_numparse=True, colalign=align)


def equal_cost_table(
    runs: pd.DataFrame, reference: str = "ppt", outcomes: Mapping[str, Outcomes] | None = None
) -> str | None:
    """The headline metric (:func:`~ppt_bench.measure.metrics.headline`: top-1) of every method
    at the costs (:func:`~ppt_bench.measure.metrics.cost`: GMACs) of the ``reference`` method's
    runs.

    A method measured within 1% of a cost shows its measured figure with its 95% interval;
    otherwise its figure is interpolated linearly between its two runs that bracket the cost
    (marked ``~``, without an interval), and left blank outside the costs it was run at. The
    best figure at a cost, in the metric's direction, is in bold only where it beats the
    runner-up significantly: both measured, on the same images, exact McNemar p < 0.05 on the
    declared outcome of their per-image ``outcomes`` (by run id). None when there is nothing to
    compare.
    """
    headline, cost = metrics.headline(), metrics.cost()
    if headline is None or cost is None:
        return None
    score, budget_in = headline.name, cost.name
    if not {score, budget_in} <= set(runs) or reference not in set(runs["method"]):
        return None
    measured = runs[score].notna() & runs[budget_in].notna()
    points = runs[measured & (runs["method"] != "baseline")]
    by_method = {m: g for m, g in points.groupby("method")}
    budgets = sorted(by_method.get(reference, points[:0])[budget_in].unique(), reverse=True)
    if not budgets or len(by_method) < 2:
        return None
    methods = [reference, *sorted(m for m in by_method if m != reference)]
    shown = headline.metric
    rows = []
    for budget in budgets:
        cells = {m: _cell_at(by_method[m], budget, score, budget_in) for m in methods}
        cells = {m: c for m, c in cells.items() if c is not None}
        best = _significant_best(cells, outcomes or {}, headline)
        row = [fmt(budget, cost.metric.spec)]
        for m in methods:
            cell = cells.get(m)
            if cell is None:
                row.append("")
                continue
            value = cell.value.value
            text = f"~{value:{shown.spec}}" if cell.interpolated else shown.cell(cell.value)
            row.append(f"**{text}**" if m == best else text)
        rows.append(row)
    header = [cost.metric.header(), *methods]
    return tabulate(rows, header, tablefmt="github", disable_numparse=True)


def equal_cost_heading(which: str) -> str:
    """The sentence above an equal-cost table (``which``: the experiment, where several)."""
    headline, cost = metrics.headline(), metrics.cost()
    assert headline is not None and cost is not None  # there is a table
    title = headline.metric.header()
    return (
        f"{title[:1].upper()}{title[1:]} at equal {cost.metric.cost}"
        f"{f' ({which})' if which else ''}: each method at the "
        "budgets of the ppt runs (`~`: interpolated between its two nearest runs, "
        "without an interval or a test; blank: outside its range). In bold: the best, "
        "where it beats the runner-up significantly (both measured on the same images, "
        "exact McNemar p < 0.05); no bold: no method is ahead at that budget, or the "
        "best or the runner-up is interpolated, which leaves it untested."
    )


class _Cell(NamedTuple):
    value: Estimate
    run_id: str | None = None  # the one run measured at the budget
    interpolated: bool = False


def _cell_at(runs: pd.DataFrame, budget: float, score: str, budget_in: str) -> _Cell | None:
    """One method's ``score`` at a cost ``budget`` (of metric ``budget_in``): the run within 1%
    of the budget (several that differ: their mean, without an interval), else interpolated
    between the runs around it, else None."""
    near = runs[np.isclose(runs[budget_in], budget, rtol=0.01)]
    near = near.drop_duplicates(["params", score])  # the same run at other batch sizes
    if len(near) == 1:
        return _Cell(Cells.estimate(near, score), near["run_id"].iloc[0])
    if len(near) > 1:
        return _Cell(Estimate(float(near[score].mean())))
    curve = runs.groupby(budget_in)[score].mean().sort_index()
    if curve.index.min() <= budget <= curve.index.max():
        return _Cell(Estimate(float(np.interp(budget, curve.index, curve.values))), None, True)
    return None


def _significant_best(
    cells: dict[str, _Cell], outcomes: Mapping[str, Outcomes], headline: metrics.Declared
) -> str | None:
    """The method with the best figure among ``cells`` if it beats the runner-up significantly
    on the paired test of their per-image outcomes, else None."""
    if len(cells) < 2:
        return None
    higher = bool(headline.metric.higher_is_better)
    ranked = sorted(cells.items(), key=lambda kv: kv[1].value.value, reverse=higher)
    (best, first), (_, second) = ranked[:2]
    a, b = outcomes.get(first.run_id or ""), outcomes.get(second.run_id or "")
    if a is None or b is None or not np.array_equal(a.label, b.label):
        return None
    outcome = headline.metric.leaderboard.test.outcome  # headline() is ranked by McNemar
    return best if stats.paired(getattr(a, outcome), getattr(b, outcome)).significant else None


def _cost_by_config(runs: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Mean cost (the metric declared ``cost``: GMACs) per (method, params) over every run that
    measured it.

    MACs do not depend on the device, dtype, compile mode or batch size, so a timing run on a
    GPU takes its ideal speedup from a MAC count made anywhere for the same configuration.
    """
    cost = metrics.cost()
    if cost is None or cost.name not in runs:
        return {}
    counted = runs[runs[cost.name].notna()]
    return counted.groupby(["method", "params"])[cost.name].mean().to_dict()


def _without_cost_only(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs less those that only counted MACs and parameters where another run of the same
    method and parameters measured something else.

    Such a run would add a row of empty cells in its own device, dtype and compile mode; its
    GMACs reach the other rows through :func:`_cost_by_config`. A configuration whose only
    runs counted MACs keeps them.
    """
    info = {"run_id", *RUN_COLUMNS, *CONTEXT, "n_images", *BUDGET_COLUMNS}
    info |= set(metrics.metrics_of(same_everywhere=True))
    measured = runs[[c for c in runs if c not in info]].notna().any(axis=1)
    measured_elsewhere = measured.groupby([runs["method"], runs["params"]]).transform("any")
    return runs[measured | ~measured_elsewhere]


def _check_one_image_count(group: pd.DataFrame) -> None:
    """A figure over different numbers of images (a metric declared ``over_images``: top-1) is
    not one figure: refuse to average it."""
    if "n_images" not in group:
        return
    for d in metrics.declared():
        if not d.metric.over_images or d.name not in group:
            continue
        measured = group.loc[group[d.name].notna(), "n_images"]
        counts = sorted(measured.dropna().astype(int).unique())
        if len(counts) > 1:
            row = group.iloc[0]
            raise UserError(
                f"{row['model']} {row['method']} {format_params(row['params'])}: "
                f"{d.metric.label} was measured on {' and '.join(map(str, counts))} images "
                "(column n_images); report those runs from separate files, or run them again "
                "with one --n-images"
            )


def _timed_batch_sizes(runs: pd.DataFrame) -> list[int]:
    """The batch sizes that speed was measured at (a MAC count's batch size says nothing)."""
    speed = [c for c in metrics.metrics_of(timing=True) if c in runs]
    timed = runs[runs[speed].notna().any(axis=1)]
    return sorted(timed["batch_size"].dropna().astype(int).unique())


def _baseline(runs: pd.DataFrame, ctx: dict[str, object]) -> pd.DataFrame:
    base = runs[runs["method"] == "baseline"]
    for col, value in ctx.items():
        base = base[base[col].astype(str) == str(value)]
    return base


def failed_table(failed: pd.DataFrame, why: str = "error") -> str:
    """Failed runs with their error, or skipped ones (``why="reason"``) with their budget."""
    budget = "budget" in failed and failed["budget"].fillna("").astype(str).ne("").any()
    rows = []
    for r in failed.itertuples():
        where = [r.budget] if budget else []
        rows.append([r.model, r.method, *where, format_params(r.params), r.batch_size, r.error])
    return tabulate(
        rows,
        ["model", "method", *(["budget"] if budget else []), "params", "batch size", why],
        tablefmt="github",
        disable_numparse=True,
    )


def where_table(df: pd.DataFrame) -> str:
    """Machines and versions behind the numbers, with the time range of their runs."""
    ok = df[df["status"] == "ok"].fillna({c: "" for c in WHERE})
    rows = []
    for key, group in ok.groupby(list(WHERE), sort=False):
        times = group["timestamp"].astype(str)
        rows.append([*key, group["run_id"].nunique(), f"{times.min()} to {times.max()}"])
    headers = [*WHERE, "runs", "timestamps (UTC)"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


HOW_TO_READ = (
    "How to read the figures: `x [a, b]` is a figure with its 95% interval. top-1, top-5 and "
    "agreement: Wilson intervals over the images. Δ top-1: the method against the unreduced "
    "model on the same images, with the exact conditional interval of the exact McNemar test; "
    "images/s: the median over timed rounds, latency: the median over every timed forward, "
    "each with its order-statistic interval, which covers the spread during the run (a machine's "
    "speed moves more than that between runs: compare methods by their paired speedups); "
    "speedup: measured in pairs, each round timing the method and then the unreduced model (or "
    "the other way round) in one process at the same batch size, every round after the first "
    "on fresh copies of both models (eager runs), the median of the per-round ratios with its "
    "interval, which covers the machine's noise during the run and where the models' weights "
    "lie in memory, not another machine, software version or load (none under 6 rounds; a "
    "speedup without one may also be the "
    "ratio of mean images/s of separate runs: the baseline's own row, or files written before "
    "speedups were paired). "
    f"`{NOT_SIGNIFICANT}` marks a difference from the baseline that "
    "is not significant at 5% (McNemar p >= 0.05, or a speedup interval that holds 1.00x): "
    "read it as a tie. Two methods' intervals overlapping does not make them equal, nor does "
    "a gap between rows make them different: compare them on the same images (the equal-MACs "
    "tables do)."
)


def render(
    df: pd.DataFrame,
    *,
    title: str,
    command: str,
    plots: Sequence[Path] = (),
    sources=(),
    notes: str | None = None,
    outcomes: Mapping[str, Outcomes] | None = None,
) -> str:
    """The report's markdown text; ``notes`` (markdown) go in a section of their own;
    ``outcomes`` (per-image, by run id) decide the significant best at equal MACs."""
    runs, failed = tidy_runs(df)
    lines = [
        f"{TITLE}{title}",
        "",
        f"Generated by `{command}` from {', '.join(f'`{s}`' for s in sources)}; "
        "regenerate it with that command instead of editing it by hand.",
        "",
        HOW_TO_READ,
        "",
    ]
    budgeted = "budget" in runs and runs["budget"].fillna("").astype(str).ne("").any()
    if budgeted:
        lines += [leaderboard.how_to_read(), ""]
    profiled = "cost_forward_ms" in runs and runs["cost_forward_ms"].notna().any()
    if profiled:
        lines += [breakdown.HOW_TO_READ, ""]
    for model, group in runs.groupby("model", sort=True):
        lines += [f"## {model}", "", model_table(group), ""]
        lines += breakdown.tables(group, _cost_by_config(group))
        if budgeted:  # leaderboards at the budgets instead of interpolated equal-cost cells
            lines += leaderboard.budget_sections(
                group, outcomes or {}, _timed_batch_sizes(_without_cost_only(group))
            )
            continue
        # One curve per experiment: runs on other weights or data are never averaged.
        kinds = varied(group, ("dataset", *IDENTITY_COLUMNS))
        experiments = group.groupby(kinds, sort=True) if kinds else [((), group)]
        for key, experiment in experiments:
            equal = equal_cost_table(experiment, outcomes=outcomes)
            if not equal:
                continue
            which = ", ".join(f"{c} {v}" for c, v in zip(kinds, key, strict=True))
            lines += [equal_cost_heading(which), "", equal, ""]
    if runs.empty:
        lines += ["No run finished.", ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    skipped = failed[failed["status"] == "skipped"]
    failed = failed[failed["status"] != "skipped"]
    if not skipped.empty:
        lines += ["## Skipped at their budget", "", failed_table(skipped, "reason"), ""]
    if not failed.empty:
        lines += ["## Failed runs", "", failed_table(failed), ""]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            lines += [f"![{plot.stem}]({plot.name})", ""]
    if not runs.empty:
        lines += ["## Where it ran", "", where_table(df), ""]
    return "\n".join(lines)


def check_report_path(
    out: str | os.PathLike, csvs: Sequence[str | os.PathLike], what: str = "report"
) -> Path:
    """Check, before any work, that the report ``out`` can be written and is none of ``csvs``.

    Args:
        out: the markdown file.
        csvs: the results CSVs it is made from (or will be, for a sweep).
        what: how the CLI names ``out`` (``--out``, ``--report``), for the message.

    Raises:
        UserError: ``out`` cannot be written (:func:`~ppt_bench.core.errors.check_output_path`) or
            it is one of the results CSVs, which writing the report would overwrite.
    """
    out = check_output_path(out, what)
    for csv in csvs:
        if out.resolve() == Path(csv).resolve():
            raise UserError(
                f"{what} {out} is the results file {csv}: writing the report would overwrite "
                "it; pass a .md path"
            )
    if out.is_file() and not _is_report(out):
        raise UserError(
            f"{what} {out} exists and is not a ppt-bench report: writing the report would "
            "overwrite it; pass a new .md path or delete that file first"
        )
    return out


def _is_report(path: Path) -> bool:
    """Whether ``path`` holds a report this command wrote (its first line says so)."""
    try:
        with path.open(errors="replace") as f:
            return f.readline().startswith(TITLE)
    except OSError:
        return False


def stored_outcomes(csvs: Sequence[str | os.PathLike], runs: pd.DataFrame) -> dict[str, Outcomes]:
    """The per-image outcomes kept beside the results files, for the runs that have them, each
    checked to be of its run and of the image count its rows give.

    Raises:
        UserError: one of those files is damaged or another run's.
    """
    stores = [RunStore.beside(csv) for csv in csvs]
    counts = runs.get("n_images", [math.nan] * len(runs))
    found = {}
    for run_id, n in zip(runs["run_id"], counts, strict=True):
        n_images = None if math.isnan(n) else int(n)  # NaN: no count recorded
        for store in stores:
            outcome = store.load_outcomes(run_id, n_images)
            if outcome is not None:
                found[run_id] = outcome
                break
    return found


def write_report(
    csvs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    command: str | None = None,
    notes: str | os.PathLike | None = None,
) -> Report:
    """Write the markdown report and its PNG plots (``<out stem>-<plot>.png`` beside it).

    Args:
        csvs: one or more results CSVs.
        out: the markdown file.
        command: the command line that regenerates the report (default ``ppt-bench report``).
        notes: a markdown file whose text the report carries under "Notes": what the numbers
            alone do not say (why a method falls short of its ideal speedup, say).
    """
    from ppt_bench.results.plots import write_plots  # imported here: matplotlib takes seconds

    csvs = [csvs] if isinstance(csvs, (str, os.PathLike)) else list(csvs)
    out = check_report_path(out, csvs)
    df = read_results(csvs)
    notes_text = None
    if notes is not None:
        try:
            notes_text = Path(notes).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"notes file {notes} cannot be read ({type(err).__name__})") from None
    runs, _ = tidy_runs(df)
    outcomes = stored_outcomes(csvs, runs)
    if command is None:
        extra = [] if notes is None else ["--notes", str(notes)]
        command = shlex.join(["ppt-bench", "report", *map(str, csvs), "--out", str(out), *extra])
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out.parent, out.stem)
    text = render(
        df,
        title=out.stem,
        command=command,
        plots=plots,
        sources=csvs,
        notes=notes_text,
        outcomes=outcomes,
    )
    out.write_text(text)
    return Report(out, tuple(plots))
