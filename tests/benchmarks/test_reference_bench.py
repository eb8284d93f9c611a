"""Wall time of an accuracy sweep of 8 methods and the baseline on the digits test set
(``tox -e bench``): the runs sharing the unreduced model's outputs (``shared``: computed once,
by the baseline) against each run computing them beside its own model (``per-run``), side by
side in one benchmark group. Random weights: the time, not the accuracy, is measured. The
passes of the unreduced model are counted and stored in the benchmark's ``extra_info``.
"""

from __future__ import annotations

import pytest
from test_outcomes import EIGHT, specs
from torch import nn

import ppt_bench.engine.evaluate as evaluate_module
from ppt_bench.measure.outcomes import RunStore
from ppt_bench.methods import is_patched
from ppt_bench.results.spec import RunSpec
from ppt_bench.runners.base import run_one


def sweep() -> list[RunSpec]:
    return specs(n_images=None, batch_size=64)


@pytest.fixture
def unreduced_passes(monkeypatch):
    counts = [0]
    accuracy = evaluate_module.evaluate_accuracy

    def counted(model, loader, reference=None, *args, **kwargs):
        counts[0] += (not is_patched(model)) + isinstance(reference, nn.Module)
        return accuracy(model, loader, reference, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_accuracy", counted)
    return counts


@pytest.mark.benchmark(group="accuracy sweep of 8 methods")
@pytest.mark.parametrize("mode", ["shared", "per-run"])
def test_accuracy_sweep(benchmark, tmp_path, mode, unreduced_passes):
    specs = sweep()
    folders = iter(range(1000))

    def run() -> None:
        store = RunStore(tmp_path / str(next(folders))) if mode == "shared" else None
        for spec in specs:
            assert run_one(spec, progress=False, store=store)[0]["status"] == "ok"

    run()  # warm: the digits data and the model code paths
    unreduced_passes[0] = 0
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["unreduced_passes_per_sweep"] = unreduced_passes[0] / 3
    assert unreduced_passes[0] / 3 == (1 if mode == "shared" else 1 + len(EIGHT))
