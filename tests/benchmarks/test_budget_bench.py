"""How long resolving MAC budgets takes: every method at three budgets on DeiT-S (``tox -e
bench``; skipped in the default test run).

Run it with ``pytest tests/benchmarks/test_budget_bench.py --benchmark-only
--benchmark-enable -s``: it prints the time of the cost model's set-up (one count of the
unreduced model, the block polynomials, the twin) and of the 36 resolutions, each with the
counts it took. The target is under a minute on a 2-core CPU.
"""

from __future__ import annotations

import time

import torch

from ppt_bench.methods import list_methods
from ppt_bench.sweeps.budget import ModelCost, resolve_macs

MODEL = "deit_small_patch16_224"
BUDGETS = ("macs=0.85", "macs=0.7", "macs=0.55")


def resolve_all() -> tuple[float, float, int, int, float]:
    """Set-up seconds, resolution seconds, resolutions, counts and the seconds of the counts."""
    start = time.perf_counter()
    cost = ModelCost(MODEL)
    setup = time.perf_counter() - start
    counting = [0.0]
    count = cost.count

    def timed_count(method):
        begin = time.perf_counter()
        try:
            return count(method)
        finally:
            counting[0] += time.perf_counter() - begin

    cost.count = timed_count
    counts = resolved = 0
    for name in list_methods():
        if name == "baseline":
            continue
        for budget in BUDGETS:
            res = resolve_macs(cost, name, {}, budget)
            counts += res.counts
            resolved += 1
    return setup, time.perf_counter() - start - setup, resolved, counts, counting[0]


def test_resolve_every_method_at_three_budgets_on_deit_small(benchmark):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = benchmark.pedantic(resolve_all, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    setup, seconds, resolved, counts, counting = result
    print(
        f"\n{MODEL}: set-up {setup:.1f} s, {resolved} resolutions in {seconds:.1f} s "
        f"({counts} counts by the MAC counter, {counting:.1f} s of it), "
        f"{setup + seconds:.1f} s in all"
    )
    assert resolved == 3 * (len(list_methods()) - 1)
