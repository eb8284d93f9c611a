"""``ppt-bench demo`` end to end: every registered method on the digits test set."""

from __future__ import annotations

import pytest
import timm
import torch

from ppt_bench import cli
from ppt_bench.api import Sweep
from ppt_bench.cli import main
from ppt_bench.commands import demo
from ppt_bench.methods import list_methods
from ppt_bench.models.digits import MODEL_NAME
from ppt_bench.results.records import read_results
from ppt_bench.sweeps.config import build_config


@pytest.mark.slow
def test_demo_runs_every_method_at_a_budget_and_ranks_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "BUDGETS", ("macs=0.7",))  # one of the three, for time
    monkeypatch.setenv("PPT_BENCH_WARMUP", "1")
    monkeypatch.setenv("PPT_BENCH_ITERS", "2")
    args = ["demo", "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"results: {tmp_path / 'results' / 'demo-cpu.csv'}" in out

    df = read_results(tmp_path / "results" / "demo-cpu.csv")
    assert (df["status"] == "ok").all()  # every method reaches 70% of the MACs
    assert set(df["method"]) == set(list_methods())
    assert set(df.loc[df["method"] != "baseline", "budget"]) == {"macs=0.7"}
    assert set(df["dataset"]) == {"digits"} and set(df["n_images"]) == {360}
    gmacs = df[df["metric"] == "gmacs"].set_index("method")["value"]
    share = gmacs.drop("baseline") / gmacs["baseline"]
    assert (share <= 0.7 + 1e-9).all(), share
    top1 = df[df["metric"] == "top1"].set_index("method")["value"]
    print(f"digits baseline top-1: {top1['baseline']:.2f}%")
    assert top1["baseline"] >= 95.0
    metrics = set(df.loc[df["method"] == "ppt", "metric"])
    assert {"top1", "agreement_top1", "gmacs", "samples_per_sec", "pooled_frac_block_3"} <= metrics

    report = (tmp_path / "demo-cpu.md").read_text()
    assert "### At macs=0.7" in report and "(tied)" in report
    assert "~" not in report  # no interpolated cell
    assert "pooled fraction (block: frac)" in report
    for plot in ("pareto", "speed"):
        assert (tmp_path / f"demo-cpu-{plot}.png").stat().st_size > 0
    # A second run finds every run in the CSV and only rewrites the report.
    assert main(args) == 0
    assert f"skipped {len(df['run_id'].unique())} runs" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--results-dir", "--reports-dir"])
def test_an_output_folder_that_is_a_file_is_a_user_error_before_training(
    tmp_path, monkeypatch, capsys, flag
):
    (tmp_path / "file").write_text("keep me")
    monkeypatch.setattr(
        "ppt_bench.engine.demo_model.load_or_train", lambda **k: pytest.fail("trained")
    )
    assert main(["demo", flag, str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {tmp_path / 'file'} is a file, not a folder" in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_demo_run_is_the_run_of_ppt_bench_run_with_the_same_settings(tmp_path, monkeypatch):
    checkpoint = tmp_path / "digits.pth"
    torch.save({"model": timm.create_model(MODEL_NAME).state_dict()}, checkpoint)
    monkeypatch.setattr(demo, "grid", lambda: {"ppt": None})  # the demo of one method
    config = demo.demo_config(str(checkpoint), "cpu", 64, "demo-cpu")
    config.out = str(tmp_path / "demo.csv")
    specs = Sweep.plan(config).specs
    assert all(s.data_fingerprint and s.checkpoint_sha256 and s.machine for s in specs)
    argv = ["run", "--model", MODEL_NAME, "--data", "digits", "--checkpoint", str(checkpoint)]
    argv += ["--metrics", ",".join(demo.METRICS), "--method", "ppt", "--budget", "macs=0.7"]
    args = cli.build_parser().parse_args([*argv, "--out", str(tmp_path / "run.csv")])
    run = Sweep.plan(build_config(overrides=cli._overrides(args), methods=args.method)).specs
    by_id = {s.run_id: s for s in specs}
    assert {s.run_id for s in run} <= set(by_id)  # the baseline and ppt at 70% of the MACs
    (ppt,) = (s for s in run if s.method == "ppt")
    assert by_id[ppt.run_id].budget["budget"] == "macs=0.7" and "r" in ppt.params
