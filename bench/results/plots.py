"""The report's PNG plots: accuracy vs GMACs with the Pareto front, accuracy vs measured
speedup at each batch size, throughput vs batch size, each point with its 95% interval as an
error bar where the run recorded one.

All take the wide runs frame of :func:`ppt_bench.results.report.tidy_runs` (one row per run, one
column per metric) and draw one panel per model (and batch size). A plot whose metrics are
missing is not drawn. Every method keeps one colour and marker in every plot (:func:`style`):
the marker's shape says its family (pruning: triangles, merging: circles and polygons, hybrid:
squares and diamonds), the colour which method it is; a method's runs are joined in order of
cost, and the budgets of a sweep run at budgets are drawn as dotted guides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from ppt_bench.core.errors import check_output_path
from ppt_bench.methods import PlotStyle, get_method_class, registered_methods
from ppt_bench.results import breakdown

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

ACCURACY = (("top1", "top-1 (%)"), ("agreement_top1", "top-1 agreement with baseline (%)"))

# Each family's marker shapes, and twenty colours that stay apart (tab10, then tab20's lighter
# tones). A method takes its family's markers and the colours in the order the methods were
# registered (the built-in ones first, in the registry's table; a plugin's after them), so a
# method keeps its colour and marker in every report.
FAMILY_MARKERS = {
    "pruning": ("v", "^", "<", ">", "1"),
    "merging": ("o", "h", "p", "8", "H", "*"),
    "hybrid": ("s", "D", "d", "P"),
    "other": ("X", "x", "+", "|"),
}
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79",
)  # fmt: skip


def style(method: str) -> dict[str, str]:
    """The colour, marker and family of a method, the same in every plot.

    The baseline is a black star. A registered method has its class's ``family`` and, unless
    its class declares them (``Method.style``), the colour and marker of its place among the
    registered methods (:data:`_PALETTE`, :data:`FAMILY_MARKERS`). A method that is not
    registered here is ``other``, with a colour and marker from its name.
    """
    if method == "baseline":
        return {"color": "black", "marker": "*", "family": "baseline"}
    classes = {n: get_method_class(n) for n in registered_methods() if n != "baseline"}
    if method in classes:
        family, own = classes[method].family, classes[method].style
        order = list(classes)
    else:
        family, own = "other", PlotStyle()
        order = [*classes, method]  # after every registered method
    markers = FAMILY_MARKERS.get(family, FAMILY_MARKERS["other"])
    peers = [m for m in order if m == method or (m in classes and classes[m].family == family)]
    colour = _PALETTE[order.index(method) % len(_PALETTE)]
    marker = markers[peers.index(method) % len(markers)]
    return {"color": own.color or colour, "marker": own.marker or marker, "family": family}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (cost, accuracy) that no other point beats on both: cheaper and more accurate.

    Returns them sorted by cost.
    """
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def _panels(n: int, width: float = 7.0) -> tuple[Figure, list[Axes]]:
    """``n`` panels, two per row, in a figure ``width`` inches wide (the README's width)."""
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    height = 4.2 if cols == 1 else 3.4
    fig = Figure(figsize=(width, height * rows + 0.9))  # no pyplot: files only, no display
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig: Figure, path: Path) -> Path:
    handles: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        ncol = min(len(handles), 5)
        rows = math.ceil(len(handles) / ncol)
        fig.legend(
            handles.values(),
            handles.keys(),
            loc="lower center",
            ncol=ncol,
            fontsize=8,
            frameon=False,
        )
        fig.tight_layout(rect=(0, 0.045 * rows + 0.01, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def _method_series(ax: Axes, group: pd.DataFrame, x: str, y: str, method: str) -> None:
    """One method's runs as points joined in order of cost (GMACs, else ``x``), with their
    error bars."""
    st = style(method)
    group = group.sort_values("gmacs" if _has(group, "gmacs") else x)
    family = "" if st["family"] in ("baseline", "other") else f" ({st['family']})"
    ax.errorbar(
        group[x],
        group[y],
        xerr=_yerr(group, x),
        yerr=_yerr(group, y),
        fmt="-",
        marker=st["marker"],
        color=st["color"],
        ms=8 if method == "baseline" else 6,
        mec="white" if method != "baseline" else "black",
        mew=0.5,
        lw=1.1,
        capsize=2,
        elinewidth=0.7,
        label=f"{method}{family}",
        zorder=3,
    )


def _budget_guides(ax: Axes, runs: pd.DataFrame) -> None:
    """Dotted vertical lines at the budgets in GMACs of the runs, labelled."""
    if "budget_gmacs" not in runs:
        return
    guides = runs.dropna(subset=["budget_gmacs"]).groupby("budget")["budget_gmacs"].mean()
    for label, gmacs in guides.items():
        ax.axvline(gmacs, color="0.55", ls=":", lw=1, zorder=1)
        ax.annotate(
            str(label),
            (gmacs, 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            fontsize=7,
            color="0.35",
            va="top",
            rotation=90,
        )


def plot_pareto(runs: pd.DataFrame, path: Path) -> Path | None:
    """Accuracy (top-1, else agreement) vs GMACs per model, the Pareto front as a line."""
    metric = next(
        (m for m in ACCURACY if m[0] in runs and "gmacs" in runs and _has(runs, m[0])), None
    )
    if metric is None:
        return None
    column, ylabel = metric
    points = runs.dropna(subset=[column, "gmacs"])
    keys = [k for k in ("model", "method", "params", "budget") if k in points]
    points = points.drop_duplicates(keys, keep="last")  # the same run at other batch sizes
    models = sorted(points["model"].unique())
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models, strict=True):
        mine = points[points["model"] == model]
        _budget_guides(ax, mine)
        for method, group in mine.groupby("method"):
            _method_series(ax, group, "gmacs", column, method)
        front = pareto_front(list(zip(mine["gmacs"], mine[column], strict=True)))
        ax.plot(*zip(*front, strict=True), color="0.3", lw=1.6, ls="--", alpha=0.5,
                label="Pareto front", zorder=2)  # fmt: skip
        _label_axes(ax, model, "GMACs per image", ylabel)
    return _save(fig, path)


def _label_axes(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    """One panel's title and axis labels, in the sizes every plot uses, and its grid."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def plot_speed(runs: pd.DataFrame, path: Path) -> Path | None:
    """Top-1 (else agreement) vs the measured paired speedup, one panel per model and batch
    size (the figure of ToMe's paper): up and to the right is better."""
    metric = next((m for m in ACCURACY if _has(runs, m[0])), None)
    if metric is None or not _has(runs, "speedup"):
        return None
    column, ylabel = metric
    accuracy = runs.dropna(subset=[column])
    keys = [k for k in ("model", "method", "params", "budget") if k in runs]
    best = accuracy.drop_duplicates(keys, keep="last").set_index(keys)[column]
    low = f"low:{column}"
    timed = runs.dropna(subset=["speedup"]).copy()
    timed[column] = [best.get(tuple(r[k] for k in keys)) for _, r in timed.iterrows()]
    if low in runs:
        bounds = accuracy.drop_duplicates(keys, keep="last").set_index(keys)
        for b in ("low", "high"):
            col = f"{b}:{column}"
            timed[col] = [bounds[col].get(tuple(r[k] for k in keys)) for _, r in timed.iterrows()]
    timed = timed.dropna(subset=[column])
    if timed.empty:
        return None
    panels = sorted({(m, int(b)) for m, b in zip(timed["model"], timed["batch_size"], strict=True)})
    fig, axes = _panels(len(panels))
    for ax, (model, batch) in zip(axes, panels, strict=True):
        mine = timed[(timed["model"] == model) & (timed["batch_size"] == batch)]
        ax.axvline(1.0, color="0.55", ls=":", lw=1, zorder=1)
        for method, group in mine.groupby("method"):
            _method_series(ax, group, "speedup", column, method)
        xlabel = "measured speedup over the unreduced model (x)"
        _label_axes(ax, f"{model}, batch size {batch}", xlabel, ylabel)
    return _save(fig, path)


def plot_throughput(runs: pd.DataFrame, path: Path) -> Path | None:
    """Images/s vs batch size per model, one line per configuration (colour and marker of its
    method)."""
    if not _has(runs, "samples_per_sec"):
        return None
    timed = runs.dropna(subset=["samples_per_sec"])
    models = sorted(timed["model"].unique())
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models, strict=True):
        mine = timed[timed["model"] == model]
        keys = ["method", "params", "budget", "device", "dtype", "compile"]
        for _, group in mine.groupby([k for k in keys if k in mine], sort=False, dropna=False):
            group = group.sort_values("batch_size")
            row = group.iloc[0]
            st = style(row["method"])
            ax.errorbar(
                group["batch_size"],
                group["samples_per_sec"],
                yerr=_yerr(group, "samples_per_sec"),
                fmt="-",
                marker=st["marker"],
                color=st["color"],
                capsize=2,
                elinewidth=0.7,
                lw=1,
                alpha=0.85,
                label=row["method"],
            )
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("batch size", fontsize=9)
        ax.set_ylabel("images/s", fontsize=9)
        ax.set_xscale("log", base=2)
        sizes = sorted(mine["batch_size"].astype(int).unique())
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


# One colour per part group of the breakdown (breakdown.GROUPS), the method's steps in red.
_GROUP_COLOURS = ("#8c8c8c", "#1f77b4", "#2ca02c", "#bcbd22", "#d62728", "#e0e0e0")


def plot_breakdown(runs: pd.DataFrame, path: Path) -> Path | None:
    """Where each run's time goes: per model, budget and batch size profiled (``cost``), one
    stacked bar per method (the baseline first) of its timed ms per forward split into the
    part groups (:mod:`ppt_bench.results.breakdown`)."""
    found = [
        (f"{model}, {title}", bars)
        for model, group in runs.groupby("model", sort=True)
        for title, bars in breakdown.panels(group)
    ]
    if not found:
        return None
    fig, axes = _panels(len(found))
    for ax, (title, bars) in zip(axes, found, strict=True):
        labels = [label for label, _ in bars][::-1]  # the baseline on top
        left = [0.0] * len(bars)
        for name, colour in zip(breakdown.GROUPS, _GROUP_COLOURS, strict=True):
            widths = [b.groups[name] for _, b in bars][::-1]
            ax.barh(labels, widths, left=left, color=colour, label=name, height=0.7)
            left = [a + w for a, w in zip(left, widths, strict=True)]
        _label_axes(ax, title, "ms per forward (timed)", "")
        ax.tick_params(axis="y", labelsize=7)
    return _save(fig, path)


def _yerr(runs: pd.DataFrame, column: str):
    """Error bars from the 95% interval columns (``low:<column>``, ``high:<column>``), zero
    where a run has none; None when no run has one."""
    low, high = f"low:{column}", f"high:{column}"
    if low not in runs or high not in runs:
        return None
    below = (runs[column] - runs[low]).fillna(0).clip(lower=0)
    above = (runs[high] - runs[column]).fillna(0).clip(lower=0)
    return [below.to_numpy(), above.to_numpy()]


def _has(runs: pd.DataFrame, column: str) -> bool:
    return column in runs and bool(runs[column].notna().any())


# Each plot by the name its file ends in.
PLOTS = {
    "pareto": plot_pareto,
    "speed": plot_speed,
    "throughput": plot_throughput,
    "breakdown": plot_breakdown,
}


def plot_paths(folder: Path, stem: str) -> list[Path]:
    """The files :func:`write_plots` may write: ``folder/<stem>-<plot>.png``, one per plot
    (which the commands check before a sweep runs)."""
    return [folder / f"{stem}-{name}.png" for name in PLOTS]


def check_plot_paths(markdown: Path, what: str) -> None:
    """Check, before any work, that the plots of a report written to ``markdown`` can be written
    beside it (:func:`~ppt_bench.core.errors.check_output_path`: their names fit, for one).

    Args:
        markdown: the report.
        what: how the CLI names the report (``--report``), for the message.
    """
    for path in plot_paths(markdown.parent, markdown.stem):
        check_output_path(path, f"{what}'s plot")


def write_plots(runs: pd.DataFrame, folder: Path, stem: str) -> list[Path]:
    """Draw every plot the data allows (:func:`plot_paths`); returns their paths."""
    drawn = []
    for path, plot in zip(plot_paths(folder, stem), PLOTS.values(), strict=True):
        if not runs.empty and plot(runs, path) is not None:
            drawn.append(path)
        else:
            path.unlink(missing_ok=True)  # a plot left from an earlier report would mislead
    return drawn
