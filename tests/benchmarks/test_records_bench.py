"""Appending one run to a results CSV of 100 rows and of 100,000 rows, side by side in one
benchmark group: an append costs what its rows cost, not what the file holds, so both should
take about the same time (``tox -e bench``, or ``pytest tests/benchmarks/test_records_bench.py
--benchmark-only --benchmark-enable``).

As in a sweep, the file is read once first (the finished runs a sweep skips); each round then
appends one run of four rows, under the lock, with its check for a run already recorded.
"""

from __future__ import annotations

import csv
import itertools

import pytest

from ppt_bench.results.records import append_rows, finished_run_ids, header_for, make_rows
from ppt_bench.sweeps.grid import make_spec

METRICS = {"gmacs": 1.0, "gmacs_fvcore": 1.0, "gmacs_single_input": 1.0, "param_count": 2.0}


@pytest.fixture(scope="module")
def one_run() -> list[dict]:
    return make_rows(make_spec("vit_digits_patch4_32", "merge", {"r": 2}), METRICS)


def write_results(path, run: list[dict], n_rows: int) -> None:
    """A results file of ``n_rows`` rows: copies of ``run``'s rows, each copy its own run."""
    columns = header_for(run)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for i in range(n_rows // len(run)):
            writer.writerows({**row, "run_id": f"old{i:09d}"} for row in run)


@pytest.mark.benchmark(group="append one run to a results CSV")
@pytest.mark.parametrize("n_rows", [100, 100_000])
def test_append_one_run(benchmark, tmp_path, one_run, n_rows):
    path = tmp_path / "r.csv"
    write_results(path, one_run, n_rows)
    assert len(finished_run_ids(path)) == n_rows // len(one_run)  # the sweep's first read
    ids = (f"new{i:09d}" for i in itertools.count())

    def next_run():
        return (path, [{**row, "run_id": run_id} for row in one_run for run_id in [next(ids)]]), {}

    wrote = benchmark.pedantic(append_rows, setup=next_run, rounds=50, warmup_rounds=2)
    assert wrote
    benchmark.extra_info["file_rows"] = n_rows
