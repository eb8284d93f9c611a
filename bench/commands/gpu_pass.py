"""The GPU pass in one command: every check a lent GPU should run, in priority order, each step
capped in time, into one folder named by the device (``tox -e gpu-pass``, or
``python -m ppt_bench.commands.gpu_pass --out DIR``).

On CUDA, in this order, so that whatever finishes within the time given (``--minutes``, 10 by
default) is kept:

1. ``pytest -m gpu``: every GPU test (CUDA-graph capture and ``torch.compile`` of each method);
2. the attention micro-benchmark, the proportional-attention mask against the folded bias;
3. every method at two MAC budgets, batch 1 and 256, bf16, eager and under CUDA graphs, with
   ``macs``, ``throughput`` and ``cost``;
4. ``reduce-overhead`` for ppt, tome and evit, batch 1 and 256;
5. batch 8 and 64 for every method, eager and under CUDA graphs;
6. ``reduce-overhead`` for the other methods.

On a machine without CUDA the CUDA steps are skipped, one line each, and a CPU form of step 3
runs (``test_vit``, one budget, batch 1, fp32, eager), which CI runs. Every sweep step appends
to ``<device>-<step>.csv``; a step stopped at its cap keeps its finished runs (the sweep stops
between runs). At the end ``<device>.md`` reports every CSV written, and ``summary.md`` says what
each step did, how long it took and where its log is (``logs/``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ppt_bench.methods import list_methods

BUDGETS = ("gmacs=3.4", "gmacs=2.9")  # DeiT-S: 4.6 GMACs unreduced
CPU_BUDGET = "macs=0.8"
COMPILED_FIRST = ("ppt", "tome", "evit")


@dataclass(frozen=True)
class Step:
    """One step of the pass.

    Args:
        name: names its log and its CSV.
        argv: the command (``ppt-bench run ...`` steps append to ``<device>-<name>.csv``).
        cap: the most minutes it may take.
        cuda: needs CUDA (skipped without it).
        env: environment variables it runs with, beside this process's.
    """

    name: str
    argv: tuple[str, ...]
    cap: float
    cuda: bool = True
    env: tuple[tuple[str, str], ...] = ()


def device_slug() -> str:
    """The device's name for file names: ``nvidia-h100-80gb-hbm3``, or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _run(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "ppt_bench.cli", "run", "--quiet", "--no-report", *args)


def _sweep(name: str, methods: list[str], *args: str) -> tuple[str, ...]:
    chosen = [a for m in methods for a in ("--method", m)]
    return _run("--sweep-name", name, *chosen, *args)


def steps(out: Path, slug: str, cuda: bool) -> list[Step]:
    """The pass's steps in priority order (the CUDA form, or the CPU form without CUDA)."""
    methods = [m for m in list_methods() if m != "baseline"]
    csv = lambda name: ("--out", str(out / f"{slug}-{name}.csv"))
    timed = ("--metrics", "macs,throughput,cost", "--rounds", "7")
    cpu_timed = ("--metrics", "macs,throughput,cost", "--rounds", "6")
    gpu = ("--model", "deit_small_patch16_224", "--device", "cuda", "--dtype", "bf16", *timed)
    budgets = [a for b in BUDGETS for a in ("--budget", b)]
    modes = ("--compile", "none", "--compile", "cudagraph")
    first = [m for m in methods if m in COMPILED_FIRST]
    rest = [m for m in methods if m not in COMPILED_FIRST]
    sizes = lambda *bs: [a for b in bs for a in ("--batch-size", str(b))]
    tests = Path("tests")
    pass_steps = [
        Step("pytest-gpu", (sys.executable, "-m", "pytest", "-m", "gpu", "-q", str(tests)), 2.5),
        Step(
            "attention-bench",
            (
                sys.executable,
                "-m",
                "pytest",
                str(tests / "benchmarks" / "test_attention_bench.py"),
                "-q",
                "--benchmark-only",
                "--benchmark-enable",
                f"--benchmark-json={out / f'{slug}-attention-bench.json'}",
            ),
            1.0,
        ),
        Step(
            "eager-cudagraph",
            _sweep("gpu-eager-cudagraph", methods, *gpu, *budgets, *modes, *sizes(1, 256),
                   *csv("eager-cudagraph")),
            4.0,
        ),
        Step(
            "compiled",
            _sweep("gpu-compiled", first, *gpu, *budgets, "--compile", "reduce-overhead",
                   *sizes(1, 256), *csv("compiled")),
            2.0,
        ),
        Step(
            "batch-8-64",
            _sweep("gpu-batch-8-64", methods, *gpu, *budgets, *modes, *sizes(8, 64),
                   *csv("batch-8-64")),
            4.0,
        ),
        Step(
            "compiled-rest",
            _sweep("gpu-compiled-rest", rest, *gpu, *budgets, "--compile", "reduce-overhead",
                   *sizes(1, 256), *csv("compiled-rest")),
            4.0,
        ),
    ]  # fmt: skip
    if cuda:
        return pass_steps
    cpu = Step(
        "cpu-eager",
        _sweep(
            "cpu-pass",
            methods,
            "--model",
            "test_vit",
            "--param",
            "locations=[1,3]",
            "--budget",
            CPU_BUDGET,
            *sizes(1),
            *cpu_timed,
            *csv("cpu-eager"),
        ),
        4.0,
        cuda=False,
        # A check that the pass runs, not a measurement: short timed loops.
        env=(("PPT_BENCH_WARMUP", "2"), ("PPT_BENCH_ITERS", "3")),
    )
    return [*pass_steps[:2], cpu, *pass_steps[3:]]


def _run_capped(step: Step, log: Path, seconds: float) -> str:
    """Run one step with its output in ``log``; stop it (SIGTERM, then SIGKILL) at ``seconds``.

    Returns:
        ``ok``, ``failed (exit N)`` or ``stopped at its cap``.
    """
    with log.open("w") as f:
        f.write(shlex.join(step.argv) + "\n\n")
        f.flush()
        env = {**os.environ, **dict(step.env)}
        proc = subprocess.Popen(step.argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # a sweep stops between runs, keeping them
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return "stopped at its cap"
    return "ok" if code == 0 else f"failed (exit {code})"


def run_pass(out: Path, minutes: float = 10.0) -> list[tuple[str, str, float]]:
    """Run the pass into ``out``; returns each step's name, outcome and seconds."""
    cuda = torch.cuda.is_available()
    slug = device_slug()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * minutes
    done = []
    for step in steps(out, slug, cuda):
        if step.cuda and not cuda:
            print(f"{step.name}: skipped, no CUDA device on this machine", flush=True)
            done.append((step.name, "skipped: no CUDA", 0.0))
            continue
        left = deadline - time.monotonic()
        if left < 30:
            print(f"{step.name}: skipped, out of time", flush=True)
            done.append((step.name, "skipped: out of time", 0.0))
            continue
        t0 = time.monotonic()
        outcome = _run_capped(step, logs / f"{step.name}.log", min(60 * step.cap, left))
        seconds = time.monotonic() - t0
        print(f"{step.name}: {outcome} in {seconds:.0f} s", flush=True)
        done.append((step.name, outcome, seconds))
    csvs = sorted(out.glob(f"{slug}-*.csv"))
    if csvs:
        report = out / f"{slug}.md"
        argv = (sys.executable, "-m", "ppt_bench.cli", "report", *map(str, csvs), "--out",
                str(report))  # fmt: skip
        outcome = _run_capped(Step("report", argv, 2.0, cuda=False), logs / "report.log", 120)
        print(f"report: {outcome}, {report}", flush=True)
        done.append(("report", outcome, 0.0))
    _write_summary(out, slug, done)
    return done


def _write_summary(out: Path, slug: str, done: list[tuple[str, str, float]]) -> None:
    lines = [
        f"# GPU pass on {slug}",
        "",
        "Written by `python -m ppt_bench.commands.gpu_pass`; each step's command and output are "
        "in `logs/<step>.log`.",
        "",
        "| step | outcome | seconds |",
        "|---|---|---|",
        *(f"| {name} | {outcome} | {seconds:.0f} |" for name, outcome, seconds in done),
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ppt_bench.commands.gpu_pass", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", help="folder of its CSVs, report and logs (default results/gpu-pass-<device>)"
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="time for every step together")
    args = parser.parse_args(argv)
    out = Path(args.out or f"results/gpu-pass-{device_slug()}")
    done = run_pass(out, args.minutes)
    failed = [name for name, outcome, _ in done if outcome.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
