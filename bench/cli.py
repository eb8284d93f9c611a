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
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ppt_bench.core import cancel
from ppt_bench.core.errors import UserError
from ppt_bench.core.identity import VERSION
from ppt_bench.core.keyvalue import parse_assignment, parse_sweep, show_value
from ppt_bench.core.settings import Setting
from ppt_bench.sweeps.config import all_settings, build_config, example_config, load_config

PROG = "ppt-bench"
# Subcommands whose module provides add_arguments(parser) and run(args): command -> (module,
# help). The module is imported only when its command runs (they import torch and timm).
DELEGATED = {
    "demo": (
        "ppt_bench.commands.demo",
        "every method on the built-in digits dataset: a CSV and a report in minutes",
    ),
    "train": (
        "ppt_bench.commands.train",
        "train a ViT (the digits model by default) and save its weights",
    ),
    "visualize": (
        "ppt_bench.commands.visualize",
        "draw what each method does to the tokens of an image",
    ),
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_list_parser(sub)
    add_run_parser(sub)
    add_report_parser(sub)
    for name, (_, text) in DELEGATED.items():
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
    p.add_argument(
        "--markdown",
        action="store_true",
        help="the methods as the methods page shows them: a table, then each one's parameters",
    )


def add_run_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a sweep: models x methods x parameters x batch sizes (x dtypes x compile modes)",
        description="Run a grid of models x dtypes x compile modes x batch sizes x (methods x "
        "swept parameters), append the rows to a results CSV (skipping runs already there) and "
        "write a report. Flags override the settings of --config.",
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="sweep settings; --print-config prints an example to start from",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print an example config file (every key, with its default) and exit",
    )
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
        "--plan",
        action="store_true",
        help="print each method's setting at each --budget (knob value, GMACs, share) and exit",
    )
    for s in all_settings():
        p.add_argument(s.option, dest=s.key, **_flag(s))
    p.add_argument("--no-report", action="store_true", help="do not write a report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _flag(s: Setting) -> dict[str, Any]:
    """The ``add_argument`` keywords of a declared setting."""
    missing = s.default in (None, "") or "default" in s.help
    shown = "" if missing else f" (default {show_value(s.default)})"
    kwargs: dict[str, Any] = {"help": (s.help + shown).replace("%", "%%"), **s.cli}
    if s.kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
        return kwargs
    kwargs.update(type=s.kind, metavar=s.metavar, choices=s.choices)
    if s.axis or s.many:
        kwargs["action"] = "append"
        kwargs["help"] += "; repeatable" + (", or comma-separated" if s.many else "")
    return {k: v for k, v in kwargs.items() if v is not None}


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="markdown report and PNG plots from results CSVs")
    p.add_argument("csv", nargs="+", help="results CSVs written by ppt-bench run")
    p.add_argument("--out", metavar="MD", help="report file (default reports/<csv name>.md)")
    p.add_argument("--notes", metavar="MD", help="markdown file to include under 'Notes'")


def cmd_list(args: argparse.Namespace) -> int:
    """``ppt-bench list``: the methods, or with ``--models`` the timm ViTs the patch supports."""
    if args.limit < 1:
        raise UserError(f"--limit must be a positive integer, got {args.limit}")
    if args.models is not None:
        from ppt_bench.models.build import has_rope, patchable_models  # imported here: torch, timm

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
    from ppt_bench.methods import get_method_class, list_methods, method_params  # torch
    from ppt_bench.methods.registry import methods_markdown  # with the registry: torch

    if args.markdown:
        print(methods_markdown(), end="")
        return 0
    rows = []
    for name in list_methods():
        params = ", ".join(f"{k}={show_value(v)}" for k, v in method_params(name).items())
        rows.append([name, params or "-", get_method_class(name).description])
    print(tabulate(rows, ["method", "parameters (defaults)", "description"], tablefmt="simple"))
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def cmd_run(args: argparse.Namespace) -> int:
    """``ppt-bench run``: build and check the whole grid, run what is missing, write the report.

    Returns:
        0 when every run finished, 1 when some failed (each recorded as a failed row).
    """
    # Imported here, when the command runs: they import torch and timm.
    from ppt_bench.api import Sweep
    from ppt_bench.results.plots import check_plot_paths
    from ppt_bench.results.report import check_report_path, write_report
    from ppt_bench.sweeps.budget import parse_budget
    from ppt_bench.sweeps.grid import grid_size

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
    out = config.out_path  # checked with the other outputs by Sweep.plan
    report = None
    if not args.no_report:
        what = "--report" if config.report else "--sweep-name's report"
        report = check_report_path(config.report_path, [out], what)
        check_plot_paths(report, what)
    if args.plan:  # the table of the budgets' settings; nothing runs
        if not config.budget:
            raise UserError(
                "--plan prints the settings a sweep resolves at its budgets: add --budget"
            )
        print(Sweep.plan(config, measure=False).budget_table())
        if any(parse_budget(b).kind == "speedup" for b in config.budget):
            print("(speed budgets: the MAC starting point; the run measures from there)")
        return 0
    print(f"sweep {config.sweep_name!r}: {grid_size(config)} runs; checking them", flush=True)
    sweep = Sweep.plan(config)
    runner = sweep.runner(progress=not args.quiet)  # a Ray cluster that does not answer: here
    print(f"{len(sweep.specs)} runs in sweep {config.sweep_name!r} -> {out}", flush=True)
    if sweep.skipped:
        print(f"{len(sweep.skipped)} runs out of their budget's reach: recorded as skipped")
    summary = sweep.run(runner=runner)
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
    """The settings given on the command line, by config key (None: not given)."""
    return {s.key: getattr(args, s.key) for s in all_settings()}


def cmd_report(args: argparse.Namespace) -> int:
    """``ppt-bench report``: one report from one or several results CSVs."""
    # Imported here, when the command runs: pandas and matplotlib take seconds to import.
    from ppt_bench.results.plots import check_plot_paths
    from ppt_bench.results.report import check_report_path, write_report

    out = Path(args.out or f"reports/{Path(args.csv[0]).stem}.md")
    check_report_path(out, args.csv, "--out")
    check_plot_paths(out, "--out")
    report = write_report(args.csv, out, notes=args.notes)
    print(f"report: {report.markdown}")
    for plot in report.plots:
        print(f"plot: {plot}")
    return 0


def run_delegated(name: str, argv: Sequence[str]) -> int:
    """Import the command's module only now, let it add its flags, and run it."""
    module_name, text = DELEGATED[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise UserError(f"the {name!r} command is not available in this installation") from None
        raise UserError(f"the {name!r} command needs {err.name!r}: install it first") from None
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        raise UserError(f"the {name!r} command is not available in this installation")
    parser = Parser(prog=f"{PROG} {name}", description=text)
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
    """Entry point of ``ppt-bench``; returns the exit code (2 for a user error, 130 after
    SIGINT, 143 after SIGTERM).

    SIGTERM and Ctrl-C request a cancellation (:mod:`ppt_bench.core.cancel`): the command stops
    at its next check, within one batch or one timed round, says so in one line and keeps
    every finished run; a second Ctrl-C stops it at once.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with cancel.on_signals():
        try:
            if argv and argv[0] in DELEGATED:
                return run_delegated(argv[0], argv[1:])
            args = build_parser().parse_args(argv)
            return COMMANDS[args.command](args)
        except SystemExit as exit_:  # --help and --version
            return exit_.code if isinstance(exit_.code, int) else 0
        except cancel.Cancelled as stop:
            how = stop.reason
        except KeyboardInterrupt:  # a second Ctrl-C
            how = "SIGINT"
        except Exception as exc:
            how = cancel.reason()
            if not how:  # else it comes from the cancellation (a DataLoader worker or a
                # torchrun peer stopped by the same signal), which is the news
                message = user_error_message(exc)
                if message is None:
                    raise
                print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
                return 2
    print(f"{PROG}: {stopped_message(how)}", file=sys.stderr)
    return cancel.EXIT_CODES.get(how, 130)


def stopped_message(how: str) -> str:
    """The line after a cancellation by ``how`` (``SIGTERM``, ``SIGINT``)."""
    said = "terminated (SIGTERM)" if how == "SIGTERM" else "interrupted"
    return f"{said} within one batch or timed round; finished runs are kept in the results file"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "main", "user_error_message"]
