"""``ppt-bench demo``: the whole ablation on the built-in digits dataset, in minutes on a CPU.

Trains (or loads from the cache) the small digits ViT, then runs every registered method over a
small grid of its main parameter with the same code path as any sweep (``RunSpec`` ->
``LocalRunner`` -> ``evaluate``): accuracy and agreement on the 360 test images, MACs, CPU
throughput and token statistics. Writes ``results/demo-<device>.csv`` and
``reports/demo-<device>.md`` with plots, and prints where they are.
"""

from __future__ import annotations

import argparse
import shlex

from ppt_bench.errors import check_output_path
from ppt_bench.methods import list_methods, method_params
from ppt_bench.spec import RunSpec

# The main parameter of each method and the values the demo sweeps. Methods that remove r
# tokens at blocks 3, 6 and 9 share r, so they meet at equal MACs; the others span the same
# range of budgets. A third-party method runs once with its defaults.
GRID: dict[str, tuple[str, tuple]] = {
    "ppt": ("r", (8, 12, 16)),
    "prune": ("r", (8, 12, 16)),
    "merge": ("r", (8, 12, 16)),
    "topk": ("r", (8, 12, 16)),
    "random": ("r", (8, 12, 16)),
    "tome": ("r", (2, 3, 4)),
    "evit": ("keep_rate", (0.8, 0.65, 0.5)),
    "pitome": ("ratio", (0.95, 0.925, 0.9)),
    "tofu": ("ratio", (0.95, 0.925, 0.9)),
    # DiffRate's searched schedules are for 197 tokens: DeiT-S's 3.1, 2.9 and 2.3 merge counts
    # scaled to the digits model's 65 tokens (1 + round((c - 1) * 64 / 196)).
    "diffrate": (
        "merge_kept",
        (
            (65, 65, 61, 54, 50, 47, 44, 40, 34, 26, 23, 2),
            (65, 64, 58, 52, 47, 44, 40, 36, 29, 22, 19, 2),
            (65, 59, 52, 42, 36, 33, 27, 22, 18, 13, 11, 2),
        ),
    ),
}
METRICS = ("accuracy", "macs", "throughput", "tokens")


def demo_specs(checkpoint: str, device: str, batch_size: int, sweep: str) -> list[RunSpec]:
    """One run per registered method and value of its main parameter, plus the baseline."""
    from ppt_bench.digits import MODEL_NAME

    common = dict(
        model=MODEL_NAME,
        data="digits",
        checkpoint=checkpoint,
        device=device,
        batch_size=batch_size,
        metrics=METRICS,
        sweep=sweep,
        workers=0,
    )
    specs = [RunSpec(method="baseline", **common)]
    for name in list_methods():
        if name == "baseline":
            continue
        key, values = GRID.get(name, ("", ()))
        if key not in method_params(name):
            specs.append(RunSpec(method=name, **common))
            continue
        specs += [RunSpec(method=name, params={key: v}, **common) for v in values]
    return specs


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
    from ppt_bench.digits import load_or_train
    from ppt_bench.grid import validate
    from ppt_bench.report import write_report
    from ppt_bench.runners.local import LocalRunner

    name = args.name or f"demo-{args.device.replace(':', '')}"
    # Checked before the minutes of training and runs, not when the files are written.
    results = check_output_path(args.results_dir, "--results-dir", directory=True)
    reports = check_output_path(args.reports_dir, "--reports-dir", directory=True)
    out = check_output_path(results / f"{name}.csv", "--results-dir")
    report = check_output_path(reports / f"{name}.md", "--reports-dir")
    _, checkpoint, top1 = load_or_train(retrain=args.retrain)
    print(f"digits model: {checkpoint} (test top-1 {top1:.2f}%)", flush=True)
    specs = demo_specs(str(checkpoint), args.device, args.batch_size, name)
    validate(specs)
    print(f"{len(specs)} runs -> {out}", flush=True)
    summary = LocalRunner(out).run(specs)
    if summary.skipped:
        print(f"skipped {summary.skipped} runs already in {out}")
    print(f"{summary.ok} runs finished, {len(summary.failed)} failed")
    command = shlex.join(["ppt-bench", "report", str(out), "--out", str(report)])
    written = write_report(out, report, command=command)
    print(f"results: {out}\nreport: {written.markdown}")
    for plot in written.plots:
        print(f"plot: {plot}")
    return 1 if summary.failed else 0
