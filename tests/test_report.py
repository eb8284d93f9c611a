"""Reports: the numbers in the tables, the failed runs, the plots and the provenance."""

from __future__ import annotations

import re
from types import SimpleNamespace
from unittest.mock import patch

import numpy as np
import pytest
import torch

from ppt_bench.core.stats import Estimate
from ppt_bench.measure.accuracy import AccuracyResult, TokenStats
from ppt_bench.measure.outcomes import Outcomes, RunStore
from ppt_bench.methods import ReductionInfo
from ppt_bench.results.plots import pareto_front
from ppt_bench.results.records import append_rows, make_rows
from ppt_bench.results.report import format_params, write_report
from ppt_bench.results.spec import RunSpec

MODEL = "deit_tiny_patch16_224"


def rows(method, params, bs, metrics, **kwargs):
    spec = RunSpec(MODEL, method, params, batch_size=bs, sweep="t", metrics=("macs",))
    return make_rows(spec, metrics, dataset="synthetic", **kwargs)


@pytest.fixture
def csv(tmp_path):
    path = tmp_path / "results" / "t.csv"
    base = {"top1": 80.0, "gmacs": 1.0, "tokens_block_11": 197}
    ppt = {"top1": 79.5, "gmacs": 0.8, "tokens_block_11": 47}
    ppt |= {"pooled_frac_block_3": 0.25, "pooled_frac_block_6": 0.5}
    for bs, base_ips, ppt_ips in ((1, 100.0, 110.0), (4, 200.0, 260.0)):
        append_rows(path, rows("baseline", {}, bs, {**base, "samples_per_sec": base_ips}))
        append_rows(path, rows("ppt", {"r": 8}, bs, {**ppt, "samples_per_sec": ppt_ips}))
    append_rows(path, rows("merge", {"r": 99}, 1, {}, status="failed", error="boom: too many"))
    return path


def table_cells(line):
    return [cell.strip() for cell in line.strip("|").split("|")]


def table_row(text, method):
    return table_cells(next(x for x in text.splitlines() if x.startswith(f"| {method} ")))


def header(text):
    return table_cells(next(x for x in text.splitlines() if x.startswith("| method ")))


def test_report_compares_each_method_with_its_baseline(csv, tmp_path):
    out = tmp_path / "reports" / "t.md"
    write_report(csv, out)
    text = out.read_text()
    assert text.startswith("# ppt-bench report: t")
    assert f"`ppt-bench report {csv} --out {out}`" in text
    assert f"## {MODEL}" in text
    cells = dict(zip(header(text), table_row(text, "ppt"), strict=True))
    assert cells["params"] == "r=8"
    assert cells["top-1 (%)"] == "79.50"
    assert cells["Δ top-1 (pp)"] == "-0.50"
    assert cells["GMACs"] == "0.800"
    assert cells["MACs reduction (%)"] == "20.0"
    assert cells["ideal speedup"] == "1.25x"
    assert cells["img/s @1"] == "110.0"
    assert cells["speedup @1"] == "1.10x"
    assert cells["speedup @4"] == "1.30x"
    assert cells["tokens out"] == "47.0"
    assert cells["pooled fraction (block: frac)"] == "3: 0.25, 6: 0.50"
    base = dict(zip(header(text), table_row(text, "baseline"), strict=True))
    assert base["speedup @4"] == "1.00x"
    assert "agreement (%)" not in header(text)  # no run measured it


def test_any_boolean_figure_a_method_reports_gets_rows_and_a_column(tmp_path):
    """Not only ppt's ``pooled``: a method's own boolean per-image figure (``Reduced.stats``)
    becomes ``<name>_frac_block_<i>`` rows with their unit and a column of the report."""
    model = torch.nn.Identity()
    model.reduction_plan = SimpleNamespace(method=SimpleNamespace(paths=lambda info: []))
    model.reduction_info = ReductionInfo(
        tokens=(5, 4), locations=(1,), stats={"kept_all": torch.tensor([[True], [False]])}
    )
    tokens = TokenStats()
    with patch("ppt_bench.measure.accuracy.is_patched", return_value=True):
        tokens.update(model, batch_size=2)
    figures = tokens.metrics()
    assert figures == {"tokens_block_0": 5.0, "tokens_block_1": 4.0, "kept_all_frac_block_1": 0.5}
    path = tmp_path / "results" / "t.csv"
    append_rows(path, rows("baseline", {}, 1, {"tokens_block_1": 5.0}))
    append_rows(path, rows("merge", {"r": 1}, 1, figures))
    out = tmp_path / "t.md"
    write_report(path, out)
    text = out.read_text()
    cells = dict(zip(header(text), table_row(text, "merge"), strict=True))
    assert cells["kept_all fraction (block: frac)"] == "1: 0.50"


def test_report_lists_failed_runs_plots_and_provenance(csv, tmp_path):
    out = tmp_path / "reports" / "t.md"
    report = write_report(csv, out)
    text = out.read_text()
    failed = text.split("## Failed runs")[1]
    assert "| merge " in failed and "boom: too many" in failed
    assert [p.name for p in report.plots] == ["t-pareto.png", "t-throughput.png"]
    for plot in report.plots:
        assert plot.parent == out.parent and plot.stat().st_size > 1000
        assert f"]({plot.name})" in text
    where = text.split("## Where it ran")[1]
    assert "torch_version" in where and re.search(r"\| +4 +\| \d{4}-", where)


def test_a_rerun_that_succeeded_is_not_listed_as_failed(csv, tmp_path):
    append_rows(csv, rows("merge", {"r": 99}, 1, {"top1": 70.0, "gmacs": 0.5}))
    text = write_report(csv, tmp_path / "t.md").markdown.read_text()
    assert "## Failed runs" not in text
    assert table_row(text, "merge")[1] == "r=99"


def test_agreement_stands_in_for_missing_accuracy(tmp_path):
    path = tmp_path / "a.csv"
    append_rows(path, rows("baseline", {}, 1, {"agreement_top1": 100.0, "gmacs": 1.0}))
    append_rows(path, rows("ppt", {}, 1, {"agreement_top1": 97.0, "gmacs": 0.7}))
    report = write_report(path, tmp_path / "a.md")
    assert [p.name for p in report.plots] == ["a-pareto.png"]
    path_no_acc = tmp_path / "b.csv"
    append_rows(path_no_acc, rows("baseline", {}, 1, {"gmacs": 1.0}))
    assert write_report(path_no_acc, tmp_path / "b.md").plots == ()


def test_several_csvs_make_one_report(csv, tmp_path):
    other = tmp_path / "other.csv"
    spec = RunSpec("deit_small_patch16_224", "baseline", sweep="o", metrics=("macs",))
    append_rows(other, make_rows(spec, {"gmacs": 4.6}))
    text = write_report([csv, other], tmp_path / "both.md").markdown.read_text()
    assert f"## {MODEL}" in text and "## deit_small_patch16_224" in text


def test_pareto_front_keeps_points_nothing_beats():
    points = [(1.0, 80.0), (0.8, 79.0), (0.9, 78.0), (0.5, 70.0), (0.5, 60.0), (1.2, 79.0)]
    assert pareto_front(points) == [(0.5, 70.0), (0.8, 79.0), (1.0, 80.0)]


def test_params_are_shown_compactly():
    assert format_params('{"locations": [3, 6], "r": 16}') == "r=16, locations=[3, 6]"
    assert format_params("{}") == ""


def test_only_failed_runs_still_make_a_report(tmp_path):
    path = tmp_path / "f.csv"
    append_rows(path, rows("ppt", {"r": 4}, 1, {}, status="failed", error="bad weights"))
    report = write_report(path, tmp_path / "f.md")
    text = report.markdown.read_text()
    assert "No run finished." in text and "bad weights" in text and report.plots == ()


def test_runs_that_differ_in_dtype_compare_with_the_baseline_of_their_dtype(tmp_path):
    path = tmp_path / "d.csv"
    for dtype, base_ips, ppt_ips in (("fp32", 100.0, 150.0), ("bf16", 200.0, 220.0)):
        for method, params, ips in (("baseline", {}, base_ips), ("ppt", {"r": 8}, ppt_ips)):
            spec = RunSpec(MODEL, method, params, batch_size=4, dtype=dtype, metrics=("macs",))
            append_rows(path, make_rows(spec, {"samples_per_sec": ips}))
    text = write_report(path, tmp_path / "d.md").markdown.read_text()
    assert "dtype" in header(text)
    lines = [line for line in text.splitlines() if line.startswith("| ppt ")]
    cells = [dict(zip(header(text), table_cells(line), strict=True)) for line in lines]
    speedups = {c["dtype"]: c["speedup @4"] for c in cells}
    assert speedups == {"fp32": "1.50x", "bf16": "1.10x"}


def test_timing_runs_take_gmacs_from_a_mac_count_elsewhere(tmp_path):
    macs = tmp_path / "macs.csv"
    append_rows(macs, rows("baseline", {}, 1, {"gmacs": 1.0}))
    append_rows(macs, rows("ppt", {"r": 8}, 1, {"gmacs": 0.5}))
    gpu = tmp_path / "gpu.csv"
    for method, params, ips in (("baseline", {}, 100.0), ("ppt", {"r": 8}, 150.0)):
        spec = RunSpec(MODEL, method, params, batch_size=64, metrics=("throughput",))
        append_rows(gpu, make_rows(spec, {"samples_per_sec": ips}))
    out = tmp_path / "r.md"
    write_report([gpu, macs], out)
    text = out.read_text()
    timed = [line for line in text.splitlines() if line.startswith("| ppt ") and "150.0" in line]
    cells = dict(zip(header(text), table_cells(timed[0]), strict=True))
    assert cells["ideal speedup"] == "2.00x"
    assert cells["speedup @64"] == "1.50x"
    assert cells["% of ideal @64"] == "75"


def test_equal_macs_table_measures_or_interpolates(tmp_path):
    path = tmp_path / "t.csv"
    append_rows(path, rows("baseline", {}, 1, {"top1": 90.0, "gmacs": 1.0}))
    for r, gmacs, top1 in ((4, 0.8, 88.0), (8, 0.6, 84.0)):
        append_rows(path, rows("ppt", {"r": r}, 1, {"top1": top1, "gmacs": gmacs}))
        append_rows(path, rows("prune", {"r": r}, 1, {"top1": top1 - 1, "gmacs": gmacs}))
    for r, gmacs, top1 in ((1, 0.9, 89.0), (2, 0.7, 85.0)):
        append_rows(path, rows("tome", {"r": r}, 1, {"top1": top1, "gmacs": gmacs}))
    out = tmp_path / "t.md"
    write_report(path, out)
    lines = out.read_text().splitlines()
    start = lines.index(next(x for x in lines if x.startswith("Top-1 (%) at equal MACs")))
    table = [table_cells(x) for x in lines[start + 2 : start + 6] if x.startswith("|")]
    assert table[0] == ["GMACs", "ppt", "prune", "tome"]
    assert table[2] == ["0.800", "88.00", "87.00", "~87.00"]  # tome: halfway between 89 and 85
    assert table[3] == ["0.600", "84.00", "83.00", ""]  # below tome's cheapest run


def test_mac_counts_add_no_rows_beside_the_timed_runs_of_a_configuration(tmp_path):
    macs = tmp_path / "macs.csv"  # counted on the CPU in fp32
    for method, params, gmacs in (("baseline", {}, 1.0), ("ppt", {"r": 8}, 0.5), ("tome", {}, 0.6)):
        append_rows(macs, rows(method, params, 1, {"gmacs": gmacs, "param_count": 5.7}))
    gpu = tmp_path / "gpu.csv"
    for method, params, ips in (("baseline", {}, 100.0), ("ppt", {"r": 8}, 150.0)):
        spec = RunSpec(MODEL, method, params, batch_size=64, device="cuda", dtype="bf16")
        metrics = {"samples_per_sec": ips, "latency_p50_ms": 640 / ips}
        append_rows(gpu, make_rows(spec, metrics))
    text = write_report([gpu, macs], tmp_path / "r.md").markdown.read_text()
    table = text.split(f"## {MODEL}")[1].split("##")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [table_cells(line)[0] for line in lines[1:]] == ["baseline", "ppt", "tome"]
    cells = dict(zip(header(text), table_row(text, "ppt"), strict=True))
    assert (cells["device"], cells["GMACs"], cells["speedup @64"]) == ("cuda", "0.500", "1.50x")
    assert cells["latency p50 @64 (ms)"] == "4.27"  # the smallest batch timed, not counted
    # tome was only counted: its row stays, with its GMACs and no timings.
    tome = dict(zip(header(text), table_row(text, "tome"), strict=True))
    assert (tome["device"], tome["GMACs"], tome["img/s @64"]) == ("cpu", "0.600", "")
    # A report of MAC counts alone shows every one of them.
    alone = write_report(macs, tmp_path / "m.md").markdown.read_text()
    assert [table_row(alone, m)[2] for m in ("baseline", "ppt", "tome")] == [
        "1.000",
        "0.500",
        "0.600",
    ]


def planted_run(path, method, r, gmacs, correct, reference_correct, batch_size=1):
    """Rows and per-image outcomes of an accuracy run whose images are right where
    ``correct`` says (the unreduced model: ``reference_correct``)."""
    n = correct.size
    label = np.zeros(n, dtype=np.int64)
    outcomes = Outcomes(
        label=label,
        pred=np.where(correct, 0, 1),
        top5=np.ones(n, bool),
        loss=np.zeros(n, np.float32),
        ref_pred=np.where(reference_correct, 0, 1),
        kl=np.zeros(n, np.float32),
    )
    spec = RunSpec(MODEL, method, {"r": r} if r else {}, batch_size=batch_size, sweep="t")
    metrics = {**AccuracyResult(outcomes, 0, TokenStats()).metrics(reduced=bool(r))}
    RunStore.beside(path).save_outcomes(spec.run_id, outcomes)
    append_rows(path, make_rows(spec, {**metrics, "gmacs": gmacs}, dataset="d", n_images=n))


def test_intervals_marks_and_the_significant_best_at_equal_macs(tmp_path):
    n = 400
    reference = np.arange(n) < 360  # 90% right
    path = tmp_path / "t.csv"
    planted_run(path, "baseline", 0, 1.0, reference, reference)
    # ppt: 3 images fewer than the baseline (p = 0.25, a tie); prune: 20 fewer (significant).
    ppt = reference.copy()
    ppt[:3] = False
    prune = reference.copy()
    prune[:20] = False
    tome = reference.copy()  # as good as the baseline, 17 images better than prune
    tome[:3] = False
    planted_run(path, "ppt", 8, 0.8, ppt, reference)
    planted_run(path, "prune", 8, 0.8, prune, reference)
    planted_run(path, "tome", 4, 0.8, tome, reference)
    out = tmp_path / "t.md"
    text = write_report(path, out).markdown.read_text()
    assert "95% interval" in text.split("## ")[0]  # how to read them, before the tables
    cells = dict(zip(header(text), table_row(text, "ppt"), strict=True))
    assert cells["top-1 (%)"].startswith("89.25 [") and cells["Δ top-1 (pp)"].endswith("°")
    cells = dict(zip(header(text), table_row(text, "prune"), strict=True))
    assert cells["Δ top-1 (pp)"].startswith("-5.00 [") and not cells["Δ top-1 (pp)"].endswith("°")
    lines = text.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("Top-1 (%) at equal MACs")))
    table = [table_cells(x) for x in lines[start + 2 : start + 5] if x.startswith("|")]
    assert table[0] == ["GMACs", "ppt", "prune", "tome"]
    # ppt and tome tie at 89.25: neither beats the other, so no method is in bold.
    assert not any(cell.startswith("**") for cell in table[2])

    path2 = tmp_path / "u.csv"
    planted_run(path2, "baseline", 0, 1.0, reference, reference)
    planted_run(path2, "ppt", 8, 0.8, ppt, reference)
    better = reference.copy()
    better[360:380] = True  # 20 images the baseline missed
    planted_run(path2, "tome", 4, 0.8, better, reference)  # beats ppt by 23 images
    text = write_report(path2, tmp_path / "u.md").markdown.read_text()
    lines = text.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("Top-1 (%) at equal MACs")))
    row = [table_cells(x) for x in lines[start + 2 : start + 5] if x.startswith("|")][2]
    assert row[1].startswith("89.25 [") and row[2].startswith("**95.00 [")


def test_speedup_cells_show_the_paired_figure_and_mark_a_tie(tmp_path):
    path = tmp_path / "t.csv"
    base = {"samples_per_sec": Estimate(100.0, 95.0, 105.0)}
    append_rows(path, rows("baseline", {}, 4, base))
    fast = {"samples_per_sec": Estimate(150.0, 140.0, 160.0), "speedup": Estimate(1.5, 1.4, 1.6)}
    same = {"samples_per_sec": Estimate(101.0, 90.0, 110.0), "speedup": Estimate(1.01, 0.97, 1.05)}
    append_rows(path, rows("tome", {"r": 8}, 4, fast))
    append_rows(path, rows("ppt", {"r": 8}, 4, same))
    text = write_report(path, tmp_path / "t.md").markdown.read_text()
    assert dict(zip(header(text), table_row(text, "tome"), strict=True))["speedup @4"] == (
        "1.50x [1.40, 1.60]"
    )
    assert dict(zip(header(text), table_row(text, "ppt"), strict=True))["speedup @4"] == (
        "1.01x [0.97, 1.05]°"
    )
    assert dict(zip(header(text), table_row(text, "baseline"), strict=True))["img/s @4"] == (
        "100.0 [95.0, 105.0]"
    )


def test_the_same_images_at_two_batch_sizes_keep_their_interval_and_their_test(tmp_path):
    n = 400
    reference = np.arange(n) < 360
    better = reference.copy()
    better[360:380] = True
    path = tmp_path / "t.csv"
    for bs in (1, 8):  # accuracy measured again at each batch size of the sweep
        planted_run(path, "baseline", 0, 1.0, reference, reference, batch_size=bs)
        planted_run(path, "ppt", 8, 0.8, reference, reference, batch_size=bs)
        planted_run(path, "tome", 4, 0.8, better, reference, batch_size=bs)
    text = write_report(path, tmp_path / "t.md").markdown.read_text()
    cells = dict(zip(header(text), table_row(text, "tome"), strict=True))
    assert cells["top-1 (%)"].startswith("95.00 [")
    lines = text.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("Top-1 (%) at equal MACs")))
    row = [table_cells(x) for x in lines[start + 2 : start + 5] if x.startswith("|")][2]
    assert row[2].startswith("**95.00 [")
