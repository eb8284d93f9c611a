"""Plot styles: one colour and marker per method, the same in every plot, families apart."""

from __future__ import annotations

import pandas as pd

from ppt_bench.methods import list_methods
from ppt_bench.results.plots import FAMILIES, FAMILY_MARKERS, style, write_plots


def test_every_method_has_its_own_colour_and_a_marker_of_its_family():
    names = list_methods()
    styles = {name: style(name) for name in names}
    colours = [s["color"] for s in styles.values()]
    assert len(set(colours)) == len(colours), styles  # no two methods share a colour
    pairs = {(s["color"], s["marker"]) for s in styles.values()}
    assert len(pairs) == len(names)
    for name, s in styles.items():
        if name == "baseline":
            continue
        assert name in FAMILIES, f"{name} has no family: add it to plots.FAMILIES"
        assert s["family"] == FAMILIES[name]
        assert s["marker"] in FAMILY_MARKERS[s["family"]]
    # The families share no marker, so their shapes tell them apart.
    shapes = [set(m) for f, m in FAMILY_MARKERS.items()]
    assert all(a.isdisjoint(b) for i, a in enumerate(shapes) for b in shapes[i + 1 :])
    assert style("tome") == style("tome")  # stable
    other = style("somebody_elses_method")
    assert other["family"] == "other" and other["marker"] in FAMILY_MARKERS["other"]


def test_a_budget_sweep_draws_accuracy_against_speedup_per_batch_size(tmp_path):
    rows = []
    for bs in (1, 8):
        rows.append(
            dict(model="m", method="baseline", params="{}", budget="", budget_gmacs=None,
                 gmacs=1.0, top1=90.0, batch_size=bs, samples_per_sec=10.0 * bs)
        )  # fmt: skip
        for method, top1 in (("tome", 88.0), ("evit", 87.0)):
            for share in (0.85, 0.7):
                rows.append(
                    dict(model="m", method=method, params=f'{{"x": {share}}}',
                         budget=f"macs={share}", budget_gmacs=share, gmacs=share - 0.01,
                         top1=top1 - 10 * (1 - share), batch_size=bs, speedup=1 / share,
                         samples_per_sec=10.0 * bs / share)
                )  # fmt: skip
    drawn = write_plots(pd.DataFrame(rows), tmp_path, "r")
    assert [p.name for p in drawn] == ["r-pareto.png", "r-speed.png", "r-throughput.png"]
    assert all(p.stat().st_size > 10_000 for p in drawn)
