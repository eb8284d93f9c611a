"""The report's PNG plots: accuracy vs GMACs with the Pareto front, throughput vs batch size,
each point with its 95% interval as an error bar where the run recorded one.

Both take the wide runs frame of :func:`ppt_bench.report.tidy_runs` (one row per run, one column
per metric) and draw one panel per model. A plot whose metrics are missing is not drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ACCURACY = (("top1", "top-1 (%)"), ("agreement_top1", "top-1 agreement with baseline (%)"))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (cost, accuracy) that no other point beats on both: cheaper and more accurate.

    Returns them sorted by cost.
    """
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def _label(row: pd.Series) -> str:
    from ppt_bench.records import format_params

    params = format_params(row["params"])
    return f"{row['method']} {params}".strip()


def _panels(n: int) -> tuple[Figure, list[Axes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(runs: pd.DataFrame, path: Path) -> Path | None:
    """Accuracy (top-1, else agreement) vs GMACs per model, the Pareto front as a line."""
    metric = next(
        (m for m in ACCURACY if m[0] in runs and "gmacs" in runs and _has(runs, m[0])), None
    )
    if metric is None:
        return None
    column, ylabel = metric
    points = runs.dropna(subset=[column, "gmacs"])
    models = sorted(points["model"].unique())
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models, strict=True):
        mine = points[points["model"] == model]
        for method, group in mine.groupby("method"):
            ax.errorbar(
                group["gmacs"],
                group[column],
                yerr=_yerr(group, column),
                fmt="o",
                ms=5,
                capsize=2,
                elinewidth=0.8,
                label=method,
            )
        front = pareto_front(list(zip(mine["gmacs"], mine[column], strict=True)))
        ax.plot(*zip(*front, strict=True), color="0.3", lw=1, ls="--", label="Pareto front")
        ax.set(title=model, xlabel="GMACs per image", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_throughput(runs: pd.DataFrame, path: Path) -> Path | None:
    """Images/s vs batch size per model, one line per configuration."""
    if not _has(runs, "samples_per_sec"):
        return None
    timed = runs.dropna(subset=["samples_per_sec"])
    models = sorted(timed["model"].unique())
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models, strict=True):
        mine = timed[timed["model"] == model]
        keys = ["method", "params", "device", "dtype", "compile"]
        for _, group in mine.groupby([k for k in keys if k in mine], sort=False):
            group = group.sort_values("batch_size")
            ax.errorbar(
                group["batch_size"],
                group["samples_per_sec"],
                yerr=_yerr(group, "samples_per_sec"),
                fmt="o-",
                capsize=2,
                elinewidth=0.8,
                label=_label(group.iloc[0]),
            )
        ax.set(title=model, xlabel="batch size", ylabel="images/s")
        ax.set_xscale("log", base=2)
        sizes = sorted(mine["batch_size"].astype(int).unique())
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
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


def write_plots(runs: pd.DataFrame, folder: Path, stem: str) -> list[Path]:
    """Draw every plot the data allows as ``folder/<stem>-<plot>.png``; returns their paths."""
    drawn = []
    for name, plot in (("pareto", plot_pareto), ("throughput", plot_throughput)):
        path = folder / f"{stem}-{name}.png"
        if not runs.empty and plot(runs, path) is not None:
            drawn.append(path)
        else:
            path.unlink(missing_ok=True)  # a plot left from an earlier report would mislead
    return drawn
