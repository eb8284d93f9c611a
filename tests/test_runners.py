"""Runners record every run as it finishes, survive failed runs and resume without repeats.

The sweep end to end through the CLI is here too: once with the local runner and once on Ray,
which must give the same rows.
"""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import ppt_bench.engine.evaluate as evaluate_module
from ppt_bench.cli import main
from ppt_bench.core import cancel
from ppt_bench.measure.outcomes import RunStore
from ppt_bench.results.records import COLUMNS, make_rows, read_results, unit_of
from ppt_bench.runners.local import LocalRunner

DIGITS = "vit_digits_patch4_32"  # 32x32 input, 12 blocks: a run takes well under a second
DEIT = "deit_tiny_patch16_224"


# The fields of the runs here: two synthetic images through the digits model, tokens only.
FAST = {
    "model": DIGITS,
    "data": "synthetic",
    "batch_size": 2,
    "n_images": 2,
    "workers": 0,
    "metrics": ("tokens",),
    "sweep": "t",
}


@pytest.fixture
def fake_evaluate(monkeypatch):
    """``evaluate`` that fails for r=98 and records the specs it was called with."""
    seen = []

    def evaluate(s, **options):
        seen.append(s)
        if s.params.get("r") == 98:
            raise RuntimeError("boom\nsecond line")
        return make_rows(s, {"gmacs": 1.0})

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    return seen


def test_local_runner_appends_each_run_and_goes_on_after_a_failure(
    spec, fake_evaluate, tmp_path, monkeypatch
):
    out = tmp_path / "r.csv"
    specs = [spec(**FAST), spec("merge", {"r": 98}, **FAST), spec("merge", {"r": 4}, **FAST)]
    rows_seen_before_last = []
    fake = evaluate_module.evaluate

    def evaluate(s, **options):
        if s is specs[-1]:
            rows_seen_before_last.extend(read_results(out)["run_id"])
        return fake(s)

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    summary = LocalRunner(out, progress=False).run(specs)
    assert (summary.total, summary.skipped, summary.ok) == (3, 0, 2)
    assert summary.failed == [specs[1].run_id]
    assert rows_seen_before_last == [specs[0].run_id, specs[1].run_id]  # written as they finish
    df = read_results(out)
    failed = df[df["status"] == "failed"]
    assert list(failed["run_id"]) == [specs[1].run_id]
    assert failed["error"].item() == "RuntimeError: boom"
    assert summary.errors == [f"{DIGITS} merge r=98 (batch size 2): RuntimeError: boom"]


def test_cli_prints_each_failed_run_with_its_error(fake_evaluate, tmp_path, capsys):
    out = tmp_path / "r.csv"
    flags = ["--model", DEIT, "--method", "merge", "--sweep", "r=[4,98]", "--batch-size", "2"]
    assert main(["run", *flags, "--out", str(out), "--no-report", "--quiet"]) == 1
    printed = capsys.readouterr()
    assert "2 runs finished, 1 failed" in printed.out
    assert printed.err.splitlines() == [
        f"ppt-bench: failed run: {DEIT} merge r=98 (batch size 2): RuntimeError: boom"
    ]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_cancellation_during_a_sweep_stops_between_runs_and_keeps_the_finished_rows(
    fake_evaluate, tmp_path, capsys, monkeypatch, signal_name
):
    """A signal that comes while the second run measures (here: a request of the flag, as the
    signal handler makes) lets that run finish and be recorded, and no run starts after it; a
    run that fails once the cancellation was requested is no failed run."""
    out = tmp_path / "r.csv"
    fake = evaluate_module.evaluate

    def evaluate(s, **options):
        if len(fake_evaluate) == 1:  # the second run: the first is in the results file
            cancel.request(signal_name)
        if len(fake_evaluate) == 2:
            raise AssertionError("a run started after the cancellation")
        return fake(s, **options)

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    flags = ["--model", DEIT, "--method", "merge", "--sweep", "r=[2,4,6]", "--batch-size", "2"]
    code = main(["run", *flags, "--out", str(out), "--no-report", "--quiet"])
    assert code == {"SIGTERM": 143, "SIGINT": 130}[signal_name]
    said = "terminated (SIGTERM)" if signal_name == "SIGTERM" else "interrupted"
    assert capsys.readouterr().err == (
        f"ppt-bench: {said} within one batch or timed round; finished runs are kept in the "
        "results file\n"
    )
    df = read_results(out)
    assert [s.run_id for s in fake_evaluate] == list(df["run_id"].unique())
    assert len(fake_evaluate) == 2 and set(df["status"]) == {"ok"}
    assert not cancel.requested()  # the next command starts afresh

    def fails(s, **options):
        cancel.request("SIGINT")
        raise RuntimeError("DataLoader worker exited unexpectedly")

    monkeypatch.setattr(evaluate_module, "evaluate", fails)
    assert main(["run", *flags, "--out", str(out), "--no-report", "--quiet"]) == 130
    assert read_results(out).equals(df)  # no failed row, nothing lost


def test_local_runner_skips_finished_runs_and_retries_failed_ones(spec, fake_evaluate, tmp_path):
    out = tmp_path / "r.csv"
    specs = [spec(**FAST), spec("merge", {"r": 98}, **FAST), spec("merge", {"r": 4}, **FAST)]
    LocalRunner(out, progress=False).run(specs)
    fake_evaluate.clear()
    summary = LocalRunner(out, progress=False).run(specs)
    assert [s.run_id for s in fake_evaluate] == [specs[1].run_id]
    assert (summary.skipped, summary.ok, len(summary.failed)) == (2, 0, 1)
    assert len(read_results(out)) == 4  # 2 ok rows + the failed row twice


def test_local_runner_imports_no_ray():
    code = (
        "import sys, ppt_bench.runners, ppt_bench.runners.local, ppt_bench.cli\n"
        "assert 'ray' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_trial_errors_reported_by_tune_become_failed_rows(spec, tmp_path):
    pytest.importorskip("ray.tune")
    from ppt_bench.runners.base import SweepSummary
    from ppt_bench.runners.ray_tune import RecordRows

    s = spec("merge", {"r": 4}, **FAST)

    trial = types.SimpleNamespace(
        config={"run": {"run_id": s.run_id, "spec": s.to_dict()}},
        get_error=lambda: RuntimeError("Traceback ...\n  worker died\nOutOfMemoryError: killed"),
    )
    out = tmp_path / "r.csv"
    summary = SweepSummary(out)
    RecordRows(out, summary, total=1, progress=False).on_trial_error(0, [], trial)
    row = read_results(out).iloc[0]
    assert (row["run_id"], row["status"]) == (s.run_id, "failed")
    assert row["error"] == "TrialError: OutOfMemoryError: killed"
    assert summary.failed == [s.run_id]


# 2 methods x 2 batch sizes, plus a baseline per batch size: 6 runs.
GRID = [
    "--model", DEIT, "--method", "ppt", "--method", "merge", "--param", "r=8",
    "--batch-size", "1", "--batch-size", "2", "--metrics", "accuracy,macs,tokens,throughput",
    "--data", "synthetic", "--n-images", "2", "--workers", "0", "--sweep-name", "e2e", "--quiet",
]  # fmt: skip
# Metrics that time the machine, or describe how it was timed: they differ between runs.
TIMING = {"samples_per_sec", "cpu_threads", "latency_p50_ms", "latency_p90_ms", "peak_mem_mb"}
TIMING |= {"speedup", "baseline_samples_per_sec"}


@pytest.fixture(scope="module")
def fast_timing():
    """Few timed iterations; set before Ray starts, so that its workers inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PPT_BENCH_WARMUP", "1")
        mp.setenv("PPT_BENCH_ITERS", "2")
        yield


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, fast_timing):
    """The grid run once through the CLI with the local runner: (exit code, csv, report)."""
    folder = tmp_path_factory.mktemp("local")
    csv, md = folder / "results" / "e2e.csv", folder / "reports" / "e2e.md"
    code = main(["run", *GRID, "--out", str(csv), "--report", str(md)])
    return code, csv, md


@pytest.mark.slow
def test_cli_sweep_end_to_end_writes_schema_rows_and_a_report(local_sweep, capsys):
    code, csv, md = local_sweep
    assert code == 0
    df = read_results(csv)
    assert tuple(df.columns) == COLUMNS
    runs = df.drop_duplicates("run_id")
    assert len(runs) == 6 and set(df["status"]) == {"ok"}
    assert sorted(zip(runs["method"], runs["batch_size"], strict=True)) == [
        (m, bs) for m in ("baseline", "merge", "ppt") for bs in (1, 2)
    ]
    assert set(runs.loc[runs["method"] != "baseline", "r"]) == {8}
    assert {"gmacs", "samples_per_sec", "tokens_block_11", "pooled_frac_block_3"} <= set(
        df["metric"]
    )
    assert all(df["unit"].fillna("") == df["metric"].map(unit_of))
    merge_tokens = df[(df["method"] == "merge") & (df["metric"] == "tokens_block_11")]["value"]
    assert set(merge_tokens) == {197 - 3 * 8}
    text = md.read_text()
    assert "## deit_tiny_patch16_224" in text and "| method " in text
    assert "ppt-bench report" in text.splitlines()[2]
    pngs = sorted(md.parent.glob("e2e-*.png"))
    assert pngs and all(f"]({p.name})" in text for p in pngs)

    assert main(["run", *GRID, "--out", str(csv), "--report", str(md)]) == 0  # resume
    assert "skipped 6 runs" in capsys.readouterr().out
    assert len(read_results(csv)) == len(df)


@pytest.mark.slow
def test_cli_sweep_on_ray_gives_the_rows_of_the_local_runner(local_sweep, tmp_path, capsys):
    """The runner starts (and stops) its own local Ray instance on loopback, as the CLI does."""
    pytest.importorskip("ray.tune")
    _, local_csv, _ = local_sweep
    csv = tmp_path / "ray.csv"
    args = ["run", *GRID, "--runner", "ray", "--out", str(csv), "--no-report"]
    args += ["--ray-storage", str(tmp_path / "tune")]
    assert main(args) == 0
    local, remote = read_results(local_csv), read_results(csv)
    assert sorted(local["run_id"].unique()) == sorted(remote["run_id"].unique())
    assert len(local) == len(remote)
    key = ["run_id", "metric"]
    both = local.merge(remote, on=key, suffixes=("_local", "_ray"), validate="one_to_one")
    for column in COLUMNS:
        if column in key or column == "timestamp":
            continue
        a, b = both[f"{column}_local"], both[f"{column}_ray"]
        same = (a == b) | (a.isna() & b.isna())
        if column in ("value", "ci_low", "ci_high"):
            same |= both["metric"].isin(TIMING)
            # A float summed over the images (KL) may differ in its last bits: a Ray worker runs
            # torch on its own number of threads, and whichever process computed the unreduced
            # model's outputs first is the one whose sums every run reads.
            close = np.isclose(a.astype(float), b.astype(float), rtol=1e-5, atol=1e-9)
            same |= close & both["metric"].isin(("kl", "loss"))
        assert same.all(), f"{column} differs: {both.loc[~same, key].values.tolist()}"

    # The trials' per-image outcomes came back to the driver, beside the results file.
    store, local_store = RunStore.beside(csv), RunStore.beside(local_csv)
    for run_id in remote["run_id"].unique():
        mine, theirs = store.load_outcomes(run_id), local_store.load_outcomes(run_id)
        assert mine is not None and theirs is not None, run_id
        assert np.array_equal(mine.pred, theirs.pred) and np.allclose(mine.kl, theirs.kl)

    capsys.readouterr()
    assert main(args) == 0
    assert "skipped 6 runs" in capsys.readouterr().out
    assert len(read_results(csv)) == len(remote)


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance on loopback that the runner finds already started."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_runner_records_failed_trials_and_resumes(spec, ray_instance, tmp_path, monkeypatch):
    from ray import tune

    from ppt_bench.runners.ray_tune import RayRunner

    restores = []
    restore = tune.Tuner.restore

    def counted_restore(cls, *args, **kwargs):
        restores.append(args)
        return restore(*args, **kwargs)

    monkeypatch.setattr(tune.Tuner, "restore", classmethod(counted_restore))
    out, storage = tmp_path / "r.csv", tmp_path / "tune"
    # RunSpec accepts locations past the model's 12 blocks (the CLI's grid check would not), so
    # this run fails only when the method is applied, inside the trial.
    specs = [
        spec(**FAST),
        spec("merge", {"r": 4}, **FAST),
        spec("merge", {"r": 4, "locations": [30]}, **FAST),
    ]
    runner = RayRunner(out, storage_path=storage, num_cpus=2, progress=False)
    summary = runner.run(specs)
    assert (summary.ok, summary.failed) == (2, [specs[2].run_id])
    df = read_results(out)
    failed = df[df["status"] == "failed"]
    assert list(failed["run_id"]) == [specs[2].run_id]
    assert "locations [30] are outside the model's blocks" in failed["error"].item()
    assert set(df.loc[df["status"] == "ok", "run_id"]) == {s.run_id for s in specs[:2]}

    # Pretend the experiment was interrupted: the rerun restores it, runs nothing that is done,
    # and tries the failed run again.
    (experiment,) = storage.iterdir()
    (experiment / ".ppt-bench-complete").unlink()
    summary = runner.run(specs)
    assert len(restores) == 1
    assert (summary.skipped, summary.ok, summary.failed) == (2, 0, [specs[2].run_id])
    again = read_results(out)
    assert len(again) == len(df) + 1
    assert list(again["run_id"].iloc[len(df) :]) == [specs[2].run_id]
