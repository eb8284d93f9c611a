"""Two runs of one paired sweep agree within their speedup intervals (``tox -e bench``).

A 95% interval that covers what moves a speedup from one run to the next (the machine's noise,
where the models' weights lie in memory) overlaps the other run's interval for nearly every
experiment, and holds the other run's estimate for about 83% of them
(:mod:`ppt_bench.results.agreement`); an interval that covers only the spread within a run
does neither. This runs one sweep twice, in two processes one after the other (DeiT-Tiny with
random weights, every method at one MAC budget, batch 1 and 8, paired timing as the CLI does
it), and reports the agreement of their speedups in the benchmark's ``extra_info``.

Run with ``pytest tests/benchmarks/test_agreement_bench.py --benchmark-only --benchmark-enable``
on a machine with nothing else running (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ppt_bench.methods import list_methods
from ppt_bench.results.agreement import CALIBRATED_INSIDE, agreement
from ppt_bench.results.records import read_results

SWEEP = [
    "run", "--model", "deit_tiny_patch16_224", "--budget", "macs=0.7",
    "--metrics", "throughput", "--device", "cpu", "--batch-size", "1", "--batch-size", "8",
    "--workers", "0", "--no-report", "--quiet",
]  # fmt: skip


def run_sweep(out) -> None:
    """The sweep in a process of its own, with the short timing of the committed CPU sweep."""
    methods = [arg for m in list_methods() if m != "baseline" for arg in ("--method", m)]
    argv = [*SWEEP, *methods, "--out", str(out)]
    code = f"import sys; from ppt_bench.cli import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "PPT_BENCH_WARMUP": "2", "PPT_BENCH_ITERS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_two_runs_of_a_sweep_agree_within_their_speedup_intervals(benchmark, tmp_path):
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"

    def twice() -> None:
        run_sweep(first)
        run_sweep(second)

    benchmark.pedantic(twice, rounds=1, iterations=1)
    found = agreement(read_results(first), read_results(second))
    benchmark.extra_info.update(
        rows=found.rows, overlap=found.overlap, inside=found.inside, width=found.width
    )
    inside = f"inside {found.inside:.0%} (calibrated: about {CALIBRATED_INSIDE:.0%})"
    print(f"{found.rows} speedups: overlap {found.overlap:.0%}, {inside}, width {found.width:.1%}")
    assert found.rows >= 2 * (len(list_methods()) - 2)  # every method measured twice, or close
    # Two calibrated 95% intervals of one quantity overlap in all but about 1% of cases.
    assert found.overlap >= 0.9, found.missed
    assert found.inside >= 0.6, found
