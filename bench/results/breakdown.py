"""Why a speed is what it is: the report's breakdown of where each run's time goes.

A run measured with the ``cost`` metric group has each part's own time in its profiled forwards
(``part_<part>_ms``, :mod:`ppt_bench.measure.cost`). The profiler slows operator-heavy code, so
the parts are taken as shares of the profiled forward and applied to the run's unprofiled timed
figure (ms per forward from its images/s), then gathered into :data:`GROUPS`. Against the
unreduced model at the same batch size, a method at its ideal speedup (the MAC ratio) would take
the unreduced time over that ratio; the time it takes beyond that is split three ways, each
measured:

- **its own steps**: the method's ranges (scoring, matching, clustering, merging...), all of it
  beyond the ideal, since the unreduced model has none;
- **attention and MLP** above the unreduced model's over the MAC ratio (shorter sequences run
  the same kernels less efficiently);
- **the rest of the model** above the same share: the patch embedding, norms, residuals and head,
  and the time outside every part (Python between the parts).

The largest of the three is the run's main cause. Beside it stand the operators launched per
forward and the host time outside them: at a small batch, a method's cost is often its number of
operations rather than its arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tabulate import tabulate

from ppt_bench.measure.cost import part_of
from ppt_bench.measure.metrics import KERNEL

if TYPE_CHECKING:
    import pandas as pd

GROUPS = (
    "patch embed & head",
    "attention",
    "mlp",
    "norms & residuals",
    "method steps",
    "outside the parts",
)
CAUSES = {
    "steps": "its own steps",
    "compute": "attention and MLP above their MAC share",
    "rest": "the rest of the model above its MAC share",
}


def part_group(part: str) -> str:
    """The group of :data:`GROUPS` a part belongs to."""
    if part.startswith("attention"):
        return "attention"
    if part.startswith("method"):
        return "method steps"
    if part in ("norm", "residual"):
        return "norms & residuals"
    if part == "mlp":
        return "mlp"
    return "patch embed & head"


def _parts(row: pd.Series) -> dict[str, float]:
    """The run's host time per part in its profiled forward (ms)."""
    out = {}
    for col, value in row.items():
        found = part_of(str(col))
        if found is not None and not found[1] and value == value:
            out[found[0]] = float(value)
    return out


@dataclass(frozen=True)
class Breakdown:
    """One run's timed forward split into :data:`GROUPS` (ms), with its operators."""

    total: float
    groups: dict[str, float]
    ops: float
    host: float
    kernels: str

    @property
    def steps(self) -> float:
        return self.groups["method steps"]

    @property
    def compute(self) -> float:
        return self.groups["attention"] + self.groups["mlp"]

    @property
    def rest(self) -> float:
        return self.total - self.steps - self.compute


def breakdown(row: pd.Series, ips: float | None = None, parts_of: pd.Series | None = None):
    """A run's timed ms per forward split into groups by its profiled parts' shares, or None
    without a profile and a timed figure.

    Args:
        row: the run.
        ips: the images/s to split (default: the run's own ``samples_per_sec``).
        parts_of: the run whose profile gives the shares (default: ``row``).
    """
    src = row if parts_of is None else parts_of
    parts = _parts(src)
    profiled = src.get("cost_forward_ms", math.nan)
    ips = row.get("samples_per_sec", math.nan) if ips is None else ips
    if not parts or profiled != profiled or ips != ips or not ips:
        return None
    timed = 1e3 * float(row["batch_size"]) / float(ips)
    covered = sum(parts.values())
    outside = max(float(profiled) - covered, 0.0)
    scale = timed / (covered + outside)
    groups = dict.fromkeys(GROUPS, 0.0)
    for part, ms in parts.items():
        groups[part_group(part)] += ms * scale
    groups["outside the parts"] = outside * scale
    # The host time outside operators, in the same proportion to the timed figure.
    host = float(src.get("cost_host_ms", math.nan)) * timed / float(profiled)
    return Breakdown(timed, groups, float(src.get("cost_ops", math.nan)), host, kernels(src))


def kernels(row: pd.Series) -> str:
    """The attention kernels of the run's blocks, ``sdpa_flash_cpu x12``; without per-block
    rows (a compiled or captured run), those of its forward."""
    blocks: dict[str, float] = {}
    calls: dict[str, float] = {}
    for col, value in row.items():
        col = str(col)
        if not col.startswith(KERNEL) or value != value:
            continue
        name = col[len(KERNEL) :]
        if "_block_" in name:
            kernel = name.rsplit("_block_", 1)[0]
            blocks[kernel] = blocks.get(kernel, 0.0) + float(value)
        elif name.endswith("_calls"):
            calls[name[: -len("_calls")]] = float(value)
    counts = blocks or calls
    return ", ".join(f"{k} x{n:.0f}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def over_ideal(run: Breakdown, base: Breakdown, ideal: float) -> dict[str, float]:
    """The run's time beyond its ideal (the unreduced model's over ``ideal``), by cause."""
    return {
        "steps": run.steps,
        "compute": run.compute - base.compute / ideal,
        "rest": run.rest - base.rest / ideal,
    }


def main_cause(run: Breakdown, base: Breakdown, ideal: float) -> str | None:
    """The largest cause of the run's time beyond its ideal (None: it is within it)."""
    if run.total <= base.total / ideal:
        return None
    causes = over_ideal(run, base, ideal)
    return max(causes, key=causes.get)


def _label(row: pd.Series) -> str:
    params = str(row.get("params", "") or "")
    return row["method"] if params in ("", "{}") else f"{row['method']} {params}"


def _context(runs: pd.DataFrame) -> list[str]:
    return [c for c in ("device", "dtype", "compile") if c in runs]


def tables(runs: pd.DataFrame, costs: Mapping[tuple[str, str], float]) -> list[str]:
    """Markdown lines: for each budget (or all configurations) and batch size profiled, a table
    of where each method's time goes, then the sentence naming each method's main cause.

    Args:
        runs: one model's wide runs frame (:func:`~ppt_bench.results.report.tidy_runs`).
        costs: GMACs of each ``(method, params)`` (the report's), for the ideal speedups.
    """
    lines: list[str] = []
    base_cost = costs.get(("baseline", "{}"))
    for title, group in _groups(runs):
        lines += _table(group, title, costs, base_cost)
    return lines


def _groups(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The profiled runs of each budget (all runs without budgets) at each batch size and
    context, with the baseline's, and a title for each."""
    if "cost_forward_ms" not in runs or not runs["cost_forward_ms"].notna().any():
        return []
    profiled = runs[runs["cost_forward_ms"].notna()]
    budgets = (
        profiled["budget"].fillna("").astype(str)
        if "budget" in profiled
        else profiled["method"].map(lambda _: "")
    )
    out = []
    for budget in sorted(set(budgets) - {""}) or [""]:
        chosen = profiled[(budgets == budget) | (profiled["method"] == "baseline")]
        keys = ["batch_size", *_context(chosen)]
        for key, group in chosen.groupby(keys, sort=True, dropna=False):
            where = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
            context = ", ".join(f"{k} {v}" for k, v in where.items() if k != "batch_size")
            title = f"{budget + ', ' if budget else ''}batch size {where['batch_size']}"
            out.append((title + (f" ({context})" if context else ""), group))
    return out


def panels(runs: pd.DataFrame) -> list[tuple[str, list[tuple[str, Breakdown]]]]:
    """For the plot: each (budget, batch size, context) profiled, its title and each run's
    label and breakdown, the baseline first."""
    out = []
    for title, group in _groups(runs):
        bars = []
        ordered = group.sort_values("method", key=lambda m: m != "baseline", kind="stable")
        for _, row in ordered.iterrows():
            b = breakdown(row)
            if b is not None:
                bars.append((_label(row), b))
        if bars:
            out.append((title, bars))
    return out


def _table(
    group: pd.DataFrame,
    title: str,
    costs: Mapping[tuple[str, str], float],
    base_cost: float | None,
) -> list[str]:
    base_rows = group[group["method"] == "baseline"]
    base_row = base_rows.iloc[0] if not base_rows.empty else None
    rows, causes, within = [], [], []
    ordered = group.sort_values("method", key=lambda m: m != "baseline", kind="stable")
    for _, row in ordered.iterrows():
        b = breakdown(row)
        if b is None:
            continue
        cost = costs.get((row["method"], row.get("params", "{}")))
        ideal = base_cost / cost if base_cost and cost else None
        # The unreduced model as timed in this run's own rounds, split by its own profile.
        paired = row.get("baseline_samples_per_sec", math.nan)
        base = None
        if base_row is not None:
            base = breakdown(row, paired, base_row) if paired == paired else breakdown(base_row)
        share = None
        if base is not None and ideal and row["method"] != "baseline":
            speedup = row.get("speedup", math.nan)  # paired, as the model table's
            share = 100 * (speedup if speedup == speedup else base.total / b.total) / ideal
            cause = main_cause(b, base, ideal)
            if cause is None:
                within.append(row["method"])
            else:
                over = b.total - base.total / ideal
                part = over_ideal(b, base, ideal)[cause]
                causes.append(
                    f"{row['method']}: {CAUSES[cause]} ({part:.1f} ms; {over:.1f} ms over its "
                    "ideal in all)"
                )
        rows.append(
            [
                _label(row),
                f"{b.total:.2f}",
                "" if share is None else f"{share:.0f}",
                f"{b.steps:.2f}",
                f"{b.compute:.2f}" + ("" if base is None else f" / {base.compute:.2f}"),
                f"{b.rest:.2f}",
                f"{b.ops:,.0f}",
                f"{b.host:.2f}",
                b.kernels,
            ]
        )
    if not rows:
        return []
    headers = [
        "method",
        "ms / forward",
        "% of ideal",
        "own steps (ms)",
        "attention + MLP (ms) / unreduced",
        "rest of model (ms)",
        "operators",
        "host outside operators (ms)",
        "attention kernels",
    ]
    table = tabulate(rows, headers, tablefmt="github", disable_numparse=True)
    said = "; ".join(causes) if causes else "every method is within its ideal"
    if causes and within:
        said += f"; within their ideal: {', '.join(within)}"
    return [
        f"#### Where the time goes: {title}",
        "",
        f"Main causes: {said}.",
        "",
        table,
        "",
    ]


def _cause_ms(run: Breakdown, base: Breakdown, ideal: float, cause: str) -> float:
    return over_ideal(run, base, ideal)[cause]


HOW_TO_READ = (
    "Where the time goes: each run's timed ms per forward, split by the shares of its parts in "
    "a few profiled forwards (`cost`). `own steps` are the method's (scoring, matching, "
    "clustering, merging); `attention + MLP` is beside the unreduced model's at the same batch "
    "size; `rest of model` is the patch embedding, norms, residuals, head and the time between "
    "parts. A method at its ideal would take the unreduced time over its MAC ratio: the main "
    "cause is the largest of its own steps, the attention and MLP above that share, and the rest "
    "above it. `operators` are launched per forward; `host outside operators` is time no "
    "operator covers (Python and dispatch)."
)
