"""The ``ppt-bench`` command line: list, run, report, and the demo, train and visualize commands.

Every mistake a user can make ends as one line on stderr, ``ppt-bench: error: ...``, and exit
code 2, before anything is written. ``demo``, ``train`` and ``visualize`` live in their own
modules, imported only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from ppt_bench import __version__
from ppt_bench.errors import UserError
from ppt_bench.spec import COMPILE_MODES
from ppt_bench.throughput import DEFAULT_ROUNDS

PROG = "ppt-bench"
# Subcommands whose module (ppt_bench.<name>) provides add_arguments(parser) and run(args).
DELEGATED = {
    "demo": "every method on the built-in digits dataset: a CSV and a report in minutes",
    "train": "train a ViT (the digits model by default) and save its weights",
    "visualize": "draw what each method does to the tokens of an image",
}
EXAMPLES = f"""examples:
  {PROG} list
  {PROG} list --models 'deit*'
  {PROG} run --model deit_small_patch16_224 --method ppt --method merge --sweep r=[16,32,50] \\
      --batch-size 64 --batch-size 256 --metrics accuracy,macs,throughput --data /data/val
  {PROG} run --config sweep.toml --runner ray --ray-address HEAD_IP:6379
  {PROG} report results/sweep.csv --out reports/sweep.md
"""


class UsageError(Exception):
    """A command line argparse cannot read (unknown flag, missing value, bad choice)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line instead of exiting with the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> Parser:
    """The ``ppt-bench`` parser; delegated commands are listed but parse their own flags."""
    parser = Parser(
        prog=PROG,
        description="Benchmark token reduction in timm Vision Transformers.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_list_parser(sub)
    add_run_parser(sub)
    add_report_parser(sub)
    for name, text in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)  # parsed by the module itself
    return parser


def add_list_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="methods with their parameters, or patchable timm ViTs")
    p.add_argument(
        "--models",
        nargs="?",
        const="*",
        metavar="PATTERN",
        help="list timm ViTs the patch supports whose names match PATTERN (e.g. 'deit*')",
    )
    p.add_argument("--limit", type=int, default=40, help="list at most this many models")


def add_run_parser(sub: Any) -> None:
    from ppt_bench.dtypes import DTYPES
    from ppt_bench.metrics import names as metric_names
    from ppt_bench.runners.base import RUNNERS, runner_options

    p = sub.add_parser(
        "run",
        help="run a sweep: models x methods x parameters x batch sizes (x dtypes x compile modes)",
        description="Run a grid of models x dtypes x compile modes x batch sizes x (methods x "
        "swept parameters), append "
        "the rows to a results CSV (skipping runs already there) and write a report. Flags "
        "override the settings of --config.",
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="sweep settings; --print-config prints an example to start from",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the example config file (every key, with its default) and exit",
    )
    p.add_argument("--model", action="append", help="timm model name (repeatable)")
    p.add_argument("--method", action="append", help="method name (repeatable)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method parameter, VALUE in TOML (r=50, threshold=7e-5, locations=[3,6,9]); "
        "applies to each selected method that has it (repeatable)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=[V1,V2]",
        help="sweep a parameter over values, for each method that has it (repeatable)",
    )
    p.add_argument(
        "--budget",
        action="append",
        metavar="KIND=VALUE",
        help="compare every method at a budget instead of at its own settings: gmacs=2.9, "
        "macs=0.65 (share of the unreduced MACs) or speedup=1.4 (measured); each method's knob "
        "(r, keep_rate, ratio, schedule) is set to meet it (repeatable)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print each method's setting at each --budget (knob value, GMACs, share) and exit",
    )
    p.add_argument("--batch-size", type=int, action="append", help="batch size (repeatable)")
    p.add_argument("--metrics", action="append", help=f"comma list of {','.join(metric_names())}")
    p.add_argument("--data", help="ImageFolder root (ImageNet val layout), digits or synthetic")
    p.add_argument("--n-images", type=int, help="evaluate at most N images")
    p.add_argument("--checkpoint", metavar="PATH|URL", help="weights to load into the model")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--dtype", action="append", choices=DTYPES, help="autocast dtype (default fp32; repeatable)"
    )
    p.add_argument(
        "--compile",
        action="append",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="torch.compile mode (bare --compile: default), none (eager), or cudagraph: the "
        "eager forward captured in a CUDA graph (repeatable: --compile none --compile cudagraph)",
    )
    p.add_argument("--seed", type=int, help="seed for synthetic data and random methods")
    p.add_argument("--workers", type=int, help="DataLoader workers (default 4)")
    p.add_argument(
        "--rounds",
        type=int,
        help=f"timed rounds of throughput, each a reduced model's loop and the unreduced "
        f"model's in turn; the speedup is the median of the per-round ratios with its 95%% "
        f"interval, which needs 6 or more (default {DEFAULT_ROUNDS})",
    )
    p.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        help="decode an ImageFolder once into the preprocessed-image cache and read it from "
        "there in every run (default on); --no-cache decodes the images in every run",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="folder of the image cache (default $XDG_CACHE_HOME/ppt-bench/images); a shared "
        "file system shares it between the nodes of a cluster",
    )
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        help="add an unreduced run per model and batch size (default on)",
    )
    p.add_argument("--runner", choices=tuple(RUNNERS), help="local (default) or ray")
    for option, text in runner_options().items():
        p.add_argument(f"--{option.replace('_', '-')}", dest=option, help=text)
    p.add_argument(
        "--sweep-name",
        help="name of the sweep (default: the config file's name, else its models, methods "
        "and data)",
    )
    p.add_argument("--out", metavar="CSV", help="results file (default results/<sweep>.csv)")
    p.add_argument("--report", metavar="MD", help="report file (default reports/<sweep>.md)")
    p.add_argument("--no-report", action="store_true", help="do not write a report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="markdown report and PNG plots from results CSVs")
    p.add_argument("csv", nargs="+", help="results CSVs written by ppt-bench run")
    p.add_argument("--out", metavar="MD", help="report file (default reports/<csv name>.md)")
    p.add_argument("--notes", metavar="MD", help="markdown file to include under 'Notes'")


def cmd_list(args: argparse.Namespace) -> int:
    """``ppt-bench list``: the methods, or with ``--models`` the timm ViTs the patch supports."""
    from tabulate import tabulate

    if args.limit < 1:
        raise UserError(f"--limit must be a positive integer, got {args.limit}")
    if args.models is not None:
        from ppt_bench.models import has_rope, patchable_models

        models, candidates = patchable_models(args.models, args.limit)
        if not models:
            raise UserError(f"no timm ViT the patch supports matches {args.models!r}")
        rows = [
            [m.name, m.depth, m.embed_dim, m.patch_tokens, m.prefix_tokens, _yes(has_rope(m.name))]
            for m in models
        ]
        headers = ["model", "blocks", "embed dim", "patch tokens", "prefix tokens", "rope"]
        print(tabulate(rows, headers, tablefmt="simple"))
        if len(models) == args.limit and candidates > args.limit:
            print(f"(first {args.limit} of up to {candidates} matches: narrow the pattern)")
        return 0
    from ppt_bench.methods import get_method_class, list_methods, method_params

    rows = []
    for name in list_methods():
        params = ", ".join(f"{k}={_show(v)}" for k, v in method_params(name).items())
        rows.append([name, params or "-", get_method_class(name).description])
    print(tabulate(rows, ["method", "parameters (defaults)", "description"], tablefmt="simple"))
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def cmd_run(args: argparse.Namespace) -> int:
    """``ppt-bench run``: build and check the whole grid, run what is missing, write the report.

    Returns:
        0 when every run finished, 1 when some failed (each recorded as a failed row).
    """
    from ppt_bench.errors import check_output_path
    from ppt_bench.grid import (
        build_config,
        expand,
        load_config,
        parse_assignment,
        parse_sweep,
        validate,
    )
    from ppt_bench.metrics import timing
    from ppt_bench.report import check_report_path, write_report
    from ppt_bench.runners.base import create_runner
    from ppt_bench.throughput import iterations

    if args.print_config:
        print(example_config(), end="")
        return 0
    if args.no_report and args.report:
        raise UserError("--report and --no-report contradict each other: drop one of them")
    config = build_config(
        load_config(args.config) if args.config else None,
        overrides=_overrides(args),
        methods=args.method,
        params=[parse_assignment(p, "--param") for p in args.param],
        sweeps=[parse_sweep(s) for s in args.sweep],
    )
    out = check_output_path(config.out_path, "--out")
    report = None if args.no_report else check_report_path(config.report_path, [out], "--report")
    specs = expand(config)
    skipped: list = []
    if config.budget or args.plan:  # the knobs are set first: the defaults need not fit
        from ppt_bench.budget import plan_sweep

        specs, skipped = plan_sweep(specs, config.budget, print_only=args.plan)
        if args.plan:
            return 0
    validate(specs, check_cuda=config.runner == "local")
    if any(timing(s.metrics) for s in specs):
        iterations()  # a bad PPT_BENCH_WARMUP / PPT_BENCH_ITERS would fail every run
    runner = create_runner(
        config.runner, config.out_path, progress=not args.quiet, **config.runner_options
    )
    print(f"{len(specs)} runs in sweep {config.sweep_name!r} -> {out}", flush=True)
    if skipped:
        from ppt_bench.budget import record_skipped

        print(
            f"{record_skipped(skipped, out)} runs out of their budget's reach: recorded as skipped"
        )
    summary = runner.run(specs)
    if summary.skipped:
        print(f"skipped {summary.skipped} runs already in {out}")
    print(f"{summary.ok} runs finished, {len(summary.failed)} failed")
    for error in summary.errors:
        print(f"{PROG}: failed run: {error}", file=sys.stderr)
    print(f"results: {out}")
    if report is not None and out.exists():
        command = shlex.join([PROG, "report", str(out), "--out", str(report)])
        write_report(out, report, command=command)
        print(f"report: {report}")
    return 1 if summary.failed else 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from ppt_bench.runners.base import runner_options

    metrics = None
    if args.metrics:
        metrics = [m.strip() for text in args.metrics for m in text.split(",") if m.strip()]
    return {
        "models": args.model,
        "batch_sizes": args.batch_size,
        "metrics": metrics,
        "data": args.data,
        "n_images": args.n_images,
        "checkpoint": args.checkpoint,
        "device": args.device,
        "dtype": args.dtype,
        "compile": args.compile,
        "seed": args.seed,
        "workers": args.workers,
        "rounds": args.rounds,
        "cache": args.cache,
        "cache_dir": args.cache_dir,
        "baseline": args.baseline,
        "sweep_name": args.sweep_name,
        "runner": args.runner,
        **{option: getattr(args, option) for option in runner_options()},
        "out": args.out,
        "report": args.report,
        "budget": args.budget,
    }


def example_config() -> str:
    """The example sweep config shipped with the package: every key, documented."""
    from importlib.resources import files

    return files("ppt_bench").joinpath("configs", "example.toml").read_text()


def cmd_report(args: argparse.Namespace) -> int:
    """``ppt-bench report``: one report from one or several results CSVs."""
    from pathlib import Path

    from ppt_bench.report import check_report_path, write_report

    out = Path(args.out or f"reports/{Path(args.csv[0]).stem}.md")
    check_report_path(out, args.csv, "--out")
    report = write_report(args.csv, out, notes=args.notes)
    print(f"report: {report.markdown}")
    for plot in report.plots:
        print(f"plot: {plot}")
    return 0


def run_delegated(name: str, argv: Sequence[str]) -> int:
    """Import ``ppt_bench.<name>`` only now, let it add its flags, and run it."""
    module_name = f"ppt_bench.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise UserError(f"the {name!r} command is not available in this installation") from None
        raise UserError(f"the {name!r} command needs {err.name!r}: install it first") from None
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        raise UserError(f"the {name!r} command is not available in this installation")
    parser = Parser(prog=f"{PROG} {name}", description=DELEGATED[name])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


COMMANDS = {"list": cmd_list, "run": cmd_run, "report": cmd_report}


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user caused, or None for a programming error."""
    if isinstance(exc, (UserError, UsageError)):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or exc}: no such file or directory"
    if type(exc).__name__ == "TOMLDecodeError":
        return f"invalid TOML: {exc}"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return "CUDA out of memory: use a smaller --batch-size or fewer --n-images"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ppt-bench``; returns the exit code (2 for a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:
            return run_delegated(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished runs are kept in the results file", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "main", "user_error_message"]
