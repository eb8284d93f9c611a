"""Extending ppt-bench from outside the package: the method and the metric groups of the plugin
package in ``tests/plugins`` (a module and its dist-info, found through entry points alone)
are listed, run through ``ppt-bench run`` into the CSV and reach ``ppt-bench report``; the
method also passes the whole contract suite (``tests/test_contract.py``), resolves at budgets
and has a plot style of its own, with no change to any project file."""

from __future__ import annotations

import subprocess
import sys

from ppt_bench.cli import main
from ppt_bench.measure import metrics
from ppt_bench.methods import get_method_class, list_methods
from ppt_bench.results.plots import style
from ppt_bench.results.records import read_results


def test_the_plugin_method_and_metric_are_registered_and_listed(capsys):
    assert "distmerge" in list_methods() and "weights" in metrics.names()
    assert get_method_class("distmerge").__module__ == "ppt_bench_toy"
    assert main(["list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "distmerge" in line)
    assert "p=2.0" in row and "scored by key distance" in row
    # As a user sees it: the command in a process of its own, the plugin on its path.
    listed = subprocess.run(
        [sys.executable, "-m", "ppt_bench.cli", "list"], capture_output=True, text=True, check=True
    )
    assert "distmerge" in listed.stdout


def test_the_plugin_method_has_a_style_of_its_own():
    own = style("distmerge")
    assert own["family"] == "merging"
    others = [style(m) for m in list_methods() if m != "distmerge"]
    assert all((s["color"], s["marker"]) != (own["color"], own["marker"]) for s in others)


def test_a_method_and_a_metric_from_entry_points_reach_the_csv_and_the_report(tmp_path):
    csv, md = tmp_path / "plugin.csv", tmp_path / "plugin.md"
    args = ["run", "--model", "vit_digits_patch4_32", "--method", "distmerge", "--method", "ppt"]
    args += ["--param", "p=1.0", "--param", "r=8", "--data", "synthetic", "--n-images", "2"]
    args += ["--batch-size", "2", "--workers", "0", "--metrics", "tokens,weights"]
    assert main([*args, "--out", str(csv), "--report", str(md), "--quiet"]) == 0

    df = read_results(csv)
    assert set(df["status"]) == {"ok"}
    plugin = df[df["method"] == "distmerge"]
    # The new parameter has a column of its own; --param r=8 reached both methods that have r.
    assert set(plugin["p"]) == {1.0} and set(plugin["r"]) == {8}
    assert set(df.loc[df["method"] == "ppt", "r"]) == {8}
    assert df.loc[df["method"] != "distmerge", "p"].isna().all()
    weights = df[df["metric"] == "weights_k"]
    assert set(weights["method"]) == {"baseline", "distmerge", "ppt"}
    assert set(weights["unit"]) == {"k"}
    # 65 tokens, 8 fewer at each of blocks 3, 6 and 9.
    tokens = plugin.set_index("metric")["value"]
    assert tokens["tokens_block_2"] == 65 and tokens["tokens_block_11"] == 65 - 3 * 8

    text = md.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "weights (k)" in header
    row = next(line for line in text.splitlines() if line.startswith("| distmerge"))
    assert "p=1" in row
    # The same weights in every run: the column shows one count in each of the three rows.
    count = f"{weights['value'].iloc[0]:.1f}"
    assert text.count(f" {count} |") == 3


def test_a_declared_metric_reaches_the_table_and_the_leaderboard_in_its_direction(tmp_path):
    csv, md = tmp_path / "budget.csv", tmp_path / "budget.md"
    args = ["run", "--model", "vit_digits_patch4_32", "--method", "distmerge", "--method", "ppt"]
    args += ["--budget", "macs=0.7", "--data", "synthetic", "--n-images", "2"]
    args += ["--batch-size", "2", "--workers", "0", "--metrics", "confidence"]
    assert main([*args, "--out", str(csv), "--report", str(md), "--quiet"]) == 0

    df = read_results(csv)
    rows = df[df["metric"] == "confidence"].set_index("method")
    assert set(rows.index) == {"baseline", "distmerge", "ppt"} and set(rows["unit"]) == {"%"}

    def cell(method: str) -> str:  # as the declaration formats it: ".1f" with the interval
        low, value, high = (rows.loc[method, c] for c in ("ci_low", "value", "ci_high"))
        return f"{value:.1f} [{low:.1f}, {high:.1f}]"

    text = md.read_text()
    # The report's table: a column from the declaration alone, in every row.
    table = _table(text.split("## vit_digits_patch4_32")[1].split("###")[0])
    assert list(table[0]) == ["method", "params", "confidence (%)"]
    assert {r["method"]: r["confidence (%)"] for r in table} == {m: cell(m) for m in rows.index}
    # The leaderboard: the column, ranked in the declared direction (higher is better) by the
    # declared test (interval overlap), and the declared reading above the leaderboards.
    assert "Confidence: the most confident, and those whose interval overlaps." in text
    board = _table(text.split("### At macs=0.7")[1].split("\n## ")[0])
    best, other = rows.drop("baseline").sort_values("value", ascending=False).index
    overlap = rows.loc[other, "ci_high"] >= rows.loc[best, "ci_low"]
    assert {r["method"]: r["confidence (%)"] for r in board} == {
        best: f"{cell(best)} (most confident)",
        other: cell(other) + (" (tied)" if overlap else ""),
    }


def _table(markdown: str) -> list[dict[str, str]]:
    """The rows of the one markdown table in ``markdown``, header -> cell."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    header, *rows = ([c.strip() for c in line.strip("|").split("|")] for line in lines)
    return [dict(zip(header, row, strict=True)) for row in rows]
