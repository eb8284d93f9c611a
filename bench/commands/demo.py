"""``ppt-bench demo``: the whole ablation on the built-in digits dataset, in minutes on a CPU.

Trains (or loads from the cache) the small digits ViT, then runs every registered method at
three MAC budgets (:data:`BUDGETS`: 85%, 70% and 55% of the unreduced model's MACs, each
method's knob resolved by :mod:`ppt_bench.sweeps.budget`) as a sweep like any other
(:func:`demo_config` -> :class:`~ppt_bench.api.Sweep` -> ``LocalRunner`` -> ``evaluate``):
accuracy and agreement on the 360 test images, MACs, CPU throughput paired with the baseline
(short rounds: :data:`TIMING`) and token statistics. A budget out of a method's reach is recorded
as a skipped run.

Writes ``results/demo-<device>.csv`` and ``reports/demo-<device>.md`` with plots, and prints
where they are.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any

from ppt_bench.api import Sweep
from ppt_bench.core.errors import UserError, check_output_path
from ppt_bench.engine import demo_model
from ppt_bench.measure.outcomes import store_folder
from ppt_bench.measure.throughput import ITERS_ENV, WARMUP_ENV
from ppt_bench.methods import get_method_class, list_methods
from ppt_bench.models.digits import MODEL_NAME
from ppt_bench.results.plots import check_plot_paths
from ppt_bench.results.report import write_report
from ppt_bench.runners.base import environ
from ppt_bench.sweeps.config import SweepConfig, build_config

METRICS = ("accuracy", "macs", "throughput", "tokens")
# Timing per run: 2 warm-up forwards per model, then 7 rounds of one forward of the method and
# one of the baseline (a batch of 64 takes about 0.1 s on 2 CPU cores), so that the whole demo
# stays within minutes; PPT_BENCH_WARMUP / PPT_BENCH_ITERS override these.
TIMING = {WARMUP_ENV: "2", ITERS_ENV: "1"}
# Every method at the same costs: shares of the unreduced model's MACs.
BUDGETS = ("macs=0.85", "macs=0.7", "macs=0.55")


def grid() -> dict[str, tuple[str, tuple[Any, ...]] | None]:
    """Each registered method's demo grid (:attr:`Method.demo_grid`), the baseline aside."""
    return {name: get_method_class(name).demo_grid for name in list_methods() if name != "baseline"}


def demo_config(checkpoint: str, device: str, batch_size: int, sweep: str) -> SweepConfig:
    """The demo as a sweep like any other: the baseline, and every registered method at each of
    :data:`BUDGETS` (its knob set to meet it, its other parameters at their defaults). Its runs
    are those of ``ppt-bench run`` with the same settings, ids included."""
    settings = {
        "models": [MODEL_NAME],
        "data": "digits",
        "checkpoint": checkpoint,
        "device": device,
        "batch_sizes": [batch_size],
        "metrics": list(METRICS),
        "sweep_name": sweep,
        "workers": 0,
        "budget": list(BUDGETS),
    }
    return build_config({"methods": list(grid())}, overrides=settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retrain", action="store_true", help="train the digits model again")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward")
    parser.add_argument("--results-dir", default="results", help="where the CSV goes")
    parser.add_argument("--reports-dir", default="reports", help="where the report goes")
    parser.add_argument(
        "--name", default=None, help="file stem of the CSV and report (default demo-<device>)"
    )


def run(args: argparse.Namespace) -> int:
    name = args.name or f"demo-{args.device.replace(':', '')}"
    if Path(name).name != name or name in (".", ".."):
        raise UserError(f"--name {name!r} must be a file stem, without folders: e.g. demo-laptop")
    # Checked before the minutes of training and runs, not when the files are written.
    results = check_output_path(args.results_dir, "--results-dir", directory=True)
    reports = check_output_path(args.reports_dir, "--reports-dir", directory=True)
    out = check_output_path(results / f"{name}.csv", "--results-dir")
    report = check_output_path(reports / f"{name}.md", "--reports-dir")
    check_plot_paths(report, "--reports-dir")
    check_output_path(store_folder(out), "--results-dir", directory=True)
    _, checkpoint, top1 = demo_model.load_or_train(retrain=args.retrain)
    print(f"digits model: {checkpoint} (test top-1 {top1:.2f}%)", flush=True)
    config = demo_config(str(checkpoint), args.device, args.batch_size, name)
    config.out = str(out)
    sweep = Sweep.plan(config)
    print(f"{len(sweep.specs)} runs at {', '.join(BUDGETS)} -> {out}", flush=True)
    if sweep.skipped:
        print(f"{len(sweep.skipped)} runs out of their budget's reach: recorded as skipped")
    with environ(**{k: os.environ.get(k, v) for k, v in TIMING.items()}):
        summary = sweep.run()
    if summary.skipped:
        print(f"skipped {summary.skipped} runs already in {out}")
    print(f"{summary.ok} runs finished, {len(summary.failed)} failed")
    command = shlex.join(["ppt-bench", "report", str(out), "--out", str(report)])
    written = write_report(out, report, command=command)
    print(f"results: {out}\nreport: {written.markdown}")
    for plot in written.plots:
        print(f"plot: {plot}")
    return 1 if summary.failed else 0
