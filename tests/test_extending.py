"""Extending ppt-bench from outside the package: a method and metric groups, each installed as
an entry point of a distribution that only the test's folder holds, reach ``ppt-bench run`` and
``ppt-bench report`` without a change to any project file. One group gives only its units and
its report columns; the other declares its metric (unit, direction, table column, leaderboard
ranking and its test), which takes it to the report's table and the leaderboard."""

from __future__ import annotations

import sys
import textwrap

import pytest

from ppt_bench.cli import main
from ppt_bench.measure import metrics
from ppt_bench.methods import list_methods, registry
from ppt_bench.results.records import read_results

PLUGIN = '''
"""A third-party method and metric group."""

from dataclasses import dataclass

import torch

from ppt_bench.core import stats
from ppt_bench.methods import Method
from ppt_bench.methods.base import ScorePrune
from ppt_bench.measure.metrics import IntervalOverlap, Metric, MetricGroup, Ranked, mean_columns


@dataclass(frozen=True)
class Strided(ScorePrune):
    """Keep every ``stride``-th patch token first: a control with its own parameter name."""

    description = "keep patch tokens by position, every stride-th first"
    stride: int = 2

    def scores(self, x, feats, *, block, num_prefix):
        positions = torch.arange(x.shape[1] - num_prefix, device=x.device)
        return (positions % self.stride == 0).to(x.dtype).expand(x.shape[0], -1)


def _weights(run):
    return {"weights_k": sum(p.numel() for p in run.model.parameters()) / 1e3}


WEIGHTS = MetricGroup(
    "weights",
    {"weights_k": "k"},
    _weights,
    mean_columns(("weights (k)", "weights_k", ".1f")),
    help="parameters in thousands",
)


def _confidence(run):
    """mean top-1 probability on fixed random images"""
    images = torch.randn(16, *run.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top = run.model(images).softmax(-1).amax(-1)
    return {"confidence": stats.mean(100 * top.numpy())}


CONFIDENCE = MetricGroup(
    "confidence",
    {
        "confidence": Metric(
            "%",
            higher_is_better=True,
            spec=".1f",
            table=True,
            leaderboard=Ranked(
                IntervalOverlap(),
                best="most confident",
                reading="Confidence: the most confident, and those whose interval overlaps.",
            ),
        )
    },
    _confidence,
)
'''

ENTRY_POINTS = """
[ppt_bench.methods]
strided = ppt_bench_plugin:Strided

[ppt_bench.measure.metrics]
weights = ppt_bench_plugin:WEIGHTS
confidence = ppt_bench_plugin:CONFIDENCE
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed distribution (a module and its dist-info) on ``sys.path`` for this test."""
    site = tmp_path / "site"
    dist = site / "ppt_bench_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "ppt_bench_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ppt-bench-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(site))
    # Fresh registries that load entry points again, put back as they were afterwards.
    monkeypatch.setattr(registry, "METHODS", registry.METHODS.fresh())
    monkeypatch.setattr(metrics, "GROUPS", metrics.GROUPS.fresh())
    yield
    sys.modules.pop("ppt_bench_plugin", None)


def test_a_method_and_a_metric_from_entry_points_reach_the_csv_and_the_report(
    plugin, tmp_path, capsys
):
    assert "strided" in list_methods() and "weights" in metrics.names()
    csv, md = tmp_path / "plugin.csv", tmp_path / "plugin.md"
    args = ["run", "--model", "vit_digits_patch4_32", "--method", "strided", "--method", "ppt"]
    args += ["--param", "stride=3", "--param", "r=8", "--data", "synthetic", "--n-images", "2"]
    args += ["--batch-size", "2", "--workers", "0", "--metrics", "tokens,weights"]
    assert main([*args, "--out", str(csv), "--report", str(md), "--quiet"]) == 0

    df = read_results(csv)
    assert set(df["status"]) == {"ok"}
    strided = df[df["method"] == "strided"]
    # The new parameter has a column of its own; --param r=8 reached both methods that have r.
    assert set(strided["stride"]) == {3} and set(strided["r"]) == {8}
    assert set(df.loc[df["method"] == "ppt", "r"]) == {8}
    assert df.loc[df["method"] != "strided", "stride"].isna().all()
    weights = df[df["metric"] == "weights_k"]
    assert set(weights["method"]) == {"baseline", "strided", "ppt"}
    assert set(weights["unit"]) == {"k"}
    # 65 tokens, 8 fewer at each of blocks 3, 6 and 9.
    tokens = strided.set_index("metric")["value"]
    assert tokens["tokens_block_2"] == 65 and tokens["tokens_block_11"] == 65 - 3 * 8

    text = md.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "weights (k)" in header
    row = next(line for line in text.splitlines() if line.startswith("| strided"))
    assert "stride=3" in row
    # The same weights in every run: the column shows one count in each of the three rows.
    count = f"{weights['value'].iloc[0]:.1f}"
    assert text.count(f" {count} |") == 3


def test_a_declared_metric_reaches_the_table_and_the_leaderboard_in_its_direction(plugin, tmp_path):
    csv, md = tmp_path / "budget.csv", tmp_path / "budget.md"
    args = ["run", "--model", "vit_digits_patch4_32", "--method", "strided", "--method", "ppt"]
    args += ["--budget", "macs=0.7", "--data", "synthetic", "--n-images", "2"]
    args += ["--batch-size", "2", "--workers", "0", "--metrics", "confidence"]
    assert main([*args, "--out", str(csv), "--report", str(md), "--quiet"]) == 0

    df = read_results(csv)
    rows = df[df["metric"] == "confidence"].set_index("method")
    assert set(rows.index) == {"baseline", "strided", "ppt"} and set(rows["unit"]) == {"%"}

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
