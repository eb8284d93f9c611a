"""Plot styles: one colour and marker per method, the same in every plot, families apart."""

from __future__ import annotations

import pandas as pd

from ppt_bench.results.plots import write_plots


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
