"""Comparison reports: markdown tables and PNG plots generated from one or more results CSVs.

Per model, one table row per configuration (method, parameters, and device, dtype, compile or
dataset where those vary), compared against the baseline of the same configuration: top-1 and
its delta, agreement, GMACs and their reduction, the ideal speedup from MACs, images/s and the
measured speedup at each batch size, and ppt's pooled fraction per location. Then the runs that
failed, the plots, and where every number came from.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tabulate import tabulate

from ppt_bench.errors import UserError, check_output_path
from ppt_bench.records import read_results

if TYPE_CHECKING:
    import pandas as pd

RUN_COLUMNS = ("run_id", "model", "method", "params", "batch_size", "device", "dtype", "compile")
CONTEXT = ("device", "dtype", "compile", "dataset")  # compared only with a baseline that matches
WHERE = (
    "device_name",
    "device",
    "dtype",
    "compile",
    "torch_version",
    "timm_version",
    "ppt_bench_version",
    "git_sha",
)
POOLED = "pooled_frac_block_"
POOLED_COLUMN = "pooled fraction (block: frac)"
TOKENS = "tokens_block_"
# What ``macs`` measures: the same on every device, dtype and compile mode.
COST_METRICS = ("gmacs", "gmacs_fvcore", "gmacs_single_input", "param_count")
_TEXT_COLUMNS = {"method", "params", *CONTEXT, POOLED_COLUMN}


@dataclass(frozen=True)
class Report:
    """A written report: the markdown file and the plots next to it."""

    markdown: Path
    plots: tuple[Path, ...]


def tidy_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split results into one wide row per ``ok`` run and the failed runs that never succeeded.

    A run recorded more than once (a rerun, or the same run in two CSVs) keeps its last value
    of each metric; a failed run that later succeeded is not listed as failed.
    """
    import pandas as pd

    df = df.fillna({"params": "{}", "error": "", "dataset": ""})
    df["compile"] = df["compile"].astype(str).replace({"True": "default", "False": "none"})
    ok = df[df["status"] == "ok"]
    failed = df[(df["status"] != "ok") & ~df["run_id"].isin(ok["run_id"])]
    failed = failed.drop_duplicates("run_id", keep="last")
    info = ok.drop_duplicates("run_id", keep="last").set_index("run_id")
    values = ok.drop_duplicates(["run_id", "metric"], keep="last").pivot(
        index="run_id", columns="metric", values="value"
    )
    keep = [c for c in (*RUN_COLUMNS[1:], "dataset") if c in info]
    runs = pd.concat([info[keep], values], axis=1).reset_index()
    return runs, failed


def format_params(params: str) -> str:
    """``{"locations": [3, 6], "r": 16}`` -> ``r=16, locations=[3, 6]`` (r first)."""
    d = json.loads(params) if isinstance(params, str) and params else {}
    order = sorted(d, key=lambda k: (k != "r", k))
    return ", ".join(f"{k}={json.dumps(d[k])}" for k in order)


def _varied(runs: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in runs and runs[c].astype(str).nunique() > 1]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or value != value:  # None or NaN
        return ""
    return f"{value:{spec}}{suffix}"


def _mean(runs: pd.DataFrame, metric: str) -> float | None:
    return runs[metric].mean() if metric in runs and runs[metric].notna().any() else None


def _pooled(runs: pd.DataFrame) -> str:
    cols = sorted((c for c in runs if c.startswith(POOLED)), key=lambda c: int(c[len(POOLED) :]))
    parts = [f"{c[len(POOLED) :]}: {v:.2f}" for c in cols if (v := _mean(runs, c)) is not None]
    return ", ".join(parts)


def _last_tokens(runs: pd.DataFrame) -> float | None:
    cols = [c for c in runs if c.startswith(TOKENS) and runs[c].notna().any()]
    if not cols:
        return None
    return _mean(runs, max(cols, key=lambda c: int(c[len(TOKENS) :])))


def model_table(runs: pd.DataFrame) -> str:
    """The markdown table comparing every configuration of one model with its baseline."""
    macs = _gmacs_by_config(runs)
    runs = _without_cost_only(runs)
    context = _varied(runs, CONTEXT)
    batch_sizes = _timed_batch_sizes(runs)
    timed = "samples_per_sec" in runs and runs["samples_per_sec"].notna().any()
    groups = runs.groupby(["method", "params", *CONTEXT], sort=False, dropna=False)
    rows = []
    for key, group in groups:
        method, params, *ctx = key
        base = _baseline(runs, dict(zip(CONTEXT, ctx, strict=True)))
        gmacs = (macs.get((method, params)), macs.get(("baseline", "{}")))
        row = _table_row(group, base, method, params, ctx, context, batch_sizes, timed, gmacs)
        rows.append(row)
    rows.sort(key=lambda r: (r["method"] != "baseline", r["method"], -(r.pop("_gmacs") or 0)))
    header = list(rows[0])
    drop = [h for h in header if all(r[h] == "" for r in rows) and h not in ("method", "params")]
    header = [h for h in header if h not in drop]
    align = ["left" if h in _TEXT_COLUMNS else "right" for h in header]
    table = [[r[h] for h in header] for r in rows]
    return tabulate(table, header, tablefmt="github", disable_numparse=True, colalign=align)


def equal_macs_table(runs: pd.DataFrame, reference: str = "ppt") -> str | None:
    """Top-1 of every method at the MAC budgets of the ``reference`` method's runs.

    A method measured within 1% of a budget shows its measured top-1; otherwise its top-1 is
    interpolated linearly between its two runs that bracket the budget (marked ``~``), and left
    blank outside the budgets it was run at. None when there is nothing to compare.
    """
    import numpy as np

    if not {"top1", "gmacs"} <= set(runs) or reference not in set(runs["method"]):
        return None
    points = runs[runs["top1"].notna() & runs["gmacs"].notna() & (runs["method"] != "baseline")]
    curves = {
        m: g.groupby("gmacs")["top1"].mean().sort_index() for m, g in points.groupby("method")
    }
    budgets = sorted(curves.get(reference, {}).index, reverse=True)
    if not budgets or len(curves) < 2:
        return None
    methods = [reference, *sorted(m for m in curves if m != reference)]
    rows = []
    for budget in budgets:
        row = [f"{budget:.3f}"]
        for m in methods:
            curve = curves[m]
            near = curve[np.isclose(curve.index, budget, rtol=0.01)]
            if len(near):
                row.append(f"{near.mean():.2f}")
            elif curve.index.min() <= budget <= curve.index.max():
                row.append(f"~{np.interp(budget, curve.index, curve.values):.2f}")
            else:
                row.append("")
        rows.append(row)
    return tabulate(rows, ["GMACs", *methods], tablefmt="github", disable_numparse=True)


def _gmacs_by_config(runs: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Mean GMACs per (method, params) over every run that counted them.

    MACs do not depend on the device, dtype, compile mode or batch size, so a timing run on a
    GPU takes its ideal speedup from a MAC count made anywhere for the same configuration.
    """
    if "gmacs" not in runs:
        return {}
    counted = runs[runs["gmacs"].notna()]
    return counted.groupby(["method", "params"])["gmacs"].mean().to_dict()


def _without_cost_only(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs less those that only counted MACs and parameters where another run of the same
    method and parameters measured something else.

    Such a run would add a row of empty cells in its own device, dtype and compile mode; its
    GMACs reach the other rows through :func:`_gmacs_by_config`. A configuration whose only
    runs counted MACs keeps them.
    """
    info = {"run_id", *RUN_COLUMNS, "dataset", *COST_METRICS}
    measured = runs[[c for c in runs if c not in info]].notna().any(axis=1)
    measured_elsewhere = measured.groupby([runs["method"], runs["params"]]).transform("any")
    return runs[measured | ~measured_elsewhere]


def _timed_batch_sizes(runs: pd.DataFrame) -> list[int]:
    """The batch sizes that speed was measured at (a MAC count's batch size says nothing)."""
    speed = [c for c in ("samples_per_sec", "latency_p50_ms") if c in runs]
    timed = runs[runs[speed].notna().any(axis=1)]
    return sorted(timed["batch_size"].dropna().astype(int).unique())


def _baseline(runs: pd.DataFrame, ctx: dict[str, object]) -> pd.DataFrame:
    base = runs[runs["method"] == "baseline"]
    for col, value in ctx.items():
        base = base[base[col].astype(str) == str(value)]
    return base


def _table_row(
    group, base, method, params, ctx, context, batch_sizes, timed, gmacs
) -> dict[str, str]:
    top1, base_top1 = _mean(group, "top1"), _mean(base, "top1")
    gmacs, base_gmacs = gmacs
    row = {"method": method, "params": format_params(params)}
    row.update({c: str(v) for c, v in zip(CONTEXT, ctx, strict=True) if c in context})
    row["top-1 (%)"] = _fmt(top1, ".2f")
    delta = None if top1 is None or base_top1 is None else top1 - base_top1
    row["Δ top-1 (pp)"] = _fmt(delta, "+.2f")
    row["agreement (%)"] = _fmt(_mean(group, "agreement_top1"), ".2f")
    row["GMACs"] = _fmt(gmacs, ".3f")
    ratio = None if gmacs is None or base_gmacs is None or not gmacs else base_gmacs / gmacs
    row["MACs reduction (%)"] = _fmt(None if ratio is None else 100 * (1 - 1 / ratio), ".1f")
    row["ideal speedup"] = _fmt(ratio, ".2f", "x")
    for bs in batch_sizes if timed else []:
        ips = _mean(group[group["batch_size"] == bs], "samples_per_sec")
        base_ips = _mean(base[base["batch_size"] == bs], "samples_per_sec")
        row[f"img/s @{bs}"] = _fmt(ips, ".1f")
        speedup = None if ips is None or not base_ips else ips / base_ips
        row[f"speedup @{bs}"] = _fmt(speedup, ".2f", "x")
    if timed and batch_sizes:
        # How much of the MAC reduction turned into speed at the largest batch.
        top = row[f"speedup @{batch_sizes[-1]}"]
        share = 100 * float(top[:-1]) / ratio if top and ratio else None
        row[f"% of ideal @{batch_sizes[-1]}"] = _fmt(share, ".0f")
    if "latency_p50_ms" in group and batch_sizes:
        small = group[group["batch_size"] == batch_sizes[0]]
        row[f"latency p50 @{batch_sizes[0]} (ms)"] = _fmt(_mean(small, "latency_p50_ms"), ".2f")
    row["tokens out"] = _fmt(_last_tokens(group), ".1f")
    row[POOLED_COLUMN] = _pooled(group)
    row["_gmacs"] = gmacs
    return row


def failed_table(failed: pd.DataFrame) -> str:
    rows = [
        [r.model, r.method, format_params(r.params), r.batch_size, r.error]
        for r in failed.itertuples()
    ]
    return tabulate(
        rows,
        ["model", "method", "params", "batch size", "error"],
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


def render(
    df: pd.DataFrame,
    *,
    title: str,
    command: str,
    plots: Sequence[Path] = (),
    sources=(),
    notes: str | None = None,
) -> str:
    """The report's markdown text; ``notes`` (markdown) go in a section of their own."""
    runs, failed = tidy_runs(df)
    lines = [
        f"# ppt-bench report: {title}",
        "",
        f"Generated by `{command}` from {', '.join(f'`{s}`' for s in sources)}; "
        "regenerate it with that command instead of editing it by hand.",
        "",
    ]
    for model, group in runs.groupby("model", sort=True):
        lines += [f"## {model}", "", model_table(group), ""]
        equal = equal_macs_table(group)
        if equal:
            lines += [
                "Top-1 (%) at equal MACs: each method at the budgets of the ppt runs (`~`: "
                "interpolated between its two nearest runs; blank: outside its range).",
                "",
                equal,
                "",
            ]
    if runs.empty:
        lines += ["No run finished.", ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
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
        UserError: ``out`` cannot be written (:func:`~ppt_bench.errors.check_output_path`) or
            it is one of the results CSVs, which writing the report would overwrite.
    """
    out = check_output_path(out, what)
    for csv in csvs:
        if out.resolve() == Path(csv).resolve():
            raise UserError(
                f"{what} {out} is the results file {csv}: writing the report would overwrite "
                "it; pass a .md path"
            )
    return out


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
    from ppt_bench.plots import write_plots

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
    if command is None:
        extra = [] if notes is None else ["--notes", str(notes)]
        command = shlex.join(["ppt-bench", "report", *map(str, csvs), "--out", str(out), *extra])
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out.parent, out.stem)
    text = render(df, title=out.stem, command=command, plots=plots, sources=csvs, notes=notes_text)
    out.write_text(text)
    return Report(out, tuple(plots))
