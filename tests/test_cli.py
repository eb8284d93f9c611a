"""The ``ppt-bench`` command line: a sweep end to end (local and Ray), bad input, subcommands."""

from __future__ import annotations

import gc
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

import pytest
from torch.utils.data import DataLoader

from ppt_bench import cli
from ppt_bench.cli import main
from ppt_bench.core import cancel
from ppt_bench.methods import get_method_class, list_methods
from ppt_bench.results.records import append_rows, make_rows, read_results
from ppt_bench.results.spec import RunSpec

DEIT = "deit_tiny_patch16_224"
DIGITS = "vit_digits_patch4_32"
TERMINATED = (
    "ppt-bench: terminated (SIGTERM) within one batch or timed round; finished runs are kept in "
    "the results file"
)


# Each case: the flags added to ``run`` and the one-line error it must end with, kept in a data
# file where each case reads as three lines.
with (Path(__file__).parent / "data" / "bad_run_input.toml").open("rb") as f:
    BAD_INPUT = {name: (shlex.split(c["flags"]), c["error"]) for name, c in tomllib.load(f).items()}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    assert_one_line_error, case, tmp_path, capsys
):
    flags, message = BAD_INPUT[case]
    out, report = tmp_path / "r.csv", tmp_path / "r.md"
    args = ["run", *flags]
    for flag, default in (("--model", DEIT), ("--out", out), ("--report", report)):
        args += [] if flag in flags else [flag, str(default)]
    assert_one_line_error(main(args), capsys.readouterr().err, message)
    assert not out.exists() and not report.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models = [", "is not valid TOML"),
        ("modles = ['deit_tiny_patch16_224']", "unknown keys ['modles']"),
        (None, "is a directory"),
    ],
)
def test_unreadable_config_is_one_line_exit_2(tmp_path, capsys, text, message):
    config = tmp_path / "c.toml"
    if text is None:
        config.mkdir()
    else:
        config.write_text(text)
    out = tmp_path / "r.csv"
    assert main(["run", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppt-bench: error: config file") and err.count("\n") == 1
    assert message in err and not out.exists()


def test_results_file_of_another_tool_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    assert main(["run", "--model", DEIT, "--out", str(out), "--no-report"]) == 2
    assert "not a ppt-bench results CSV" in capsys.readouterr().err
    assert out.read_text() == "a,b\n1,2\n"


def test_sigterm_ends_a_sweep_with_one_line_and_keeps_its_finished_runs(tmp_path):
    out, log = tmp_path / "r.csv", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "ppt_bench.cli", "run", "--model", DIGITS, "--data", "digits"]
    command += ["--n-images", "16", "--metrics", "accuracy,throughput", "--rounds", "2"]
    command += ["--method", "tome", "--sweep", f"r={list(range(1, 33))}", "--out", str(out)]
    env = {**os.environ, "PPT_BENCH_WARMUP": "1", "PPT_BENCH_ITERS": "1"}
    with log.open("w") as stderr:
        proc = subprocess.Popen([*command, "--no-report", "--quiet"], env=env, stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and ",tome," in out.read_text()):  # the baseline and a run
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        kept = read_results(out)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, log.read_text()
    assert log.read_text().splitlines()[-1] == TERMINATED
    after = read_results(out)
    assert set(kept.run_id) <= set(after.run_id) and after.method.nunique() == 2
    assert after.run_id.nunique() < 33  # it stopped


def test_sigterm_only_asks_and_the_command_stops_cleanly_at_its_next_check(monkeypatch, capsys):
    """SIGTERM raises nothing where it lands (a DataLoader starting its workers, say): it asks,
    and the command stops at its next check with the DataLoader whole, so the user sees the
    one line only, and nothing reports a half-built object."""

    def command(args) -> int:
        loader = DataLoader(list(range(64)), batch_size=4, num_workers=2)
        for i, _ in enumerate(loader):
            if i == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # lands anywhere; the handler only asks
                time.sleep(0.5)  # more batches arrive meanwhile
            cancel.check()
        raise AssertionError("the loop went on after SIGTERM")

    monkeypatch.setitem(cli.COMMANDS, "list", command)
    reported: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["list"]) == 143
    gc.collect()  # whatever the command left is freed now
    assert reported == []
    assert capsys.readouterr().err == TERMINATED + "\n"
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the command


def results_csv(path: Path) -> Path:
    append_rows(path, make_rows(RunSpec(DEIT, metrics=("macs",)), {"gmacs": 1.0}))
    return path


RUN_OUTPUTS = {
    "report overwrites the results": (["--out", "r.csv", "--report", "r.csv"], "is the results"),
    "out under a file": (["--out", "file.csv/r.csv"], "file.csv is a file, not a folder"),
    "out is a folder": (["--out", "folder", "--no-report"], "--out folder is a folder"),
    "report is a folder": (["--out", "new.csv", "--report", "folder"], "--report folder is a"),
    "report under a file": (["--out", "new.csv", "--report", "file.csv/r.md"], "is a file"),
}


@pytest.mark.parametrize("case", RUN_OUTPUTS, ids=list(RUN_OUTPUTS))
def test_run_checks_its_outputs_before_any_run(
    assert_one_line_error, case, tmp_path, monkeypatch, capsys
):
    flags, message = RUN_OUTPUTS[case]
    monkeypatch.chdir(tmp_path)
    csv = results_csv(tmp_path / "r.csv")
    before = csv.read_text()
    shutil.copy(csv, tmp_path / "file.csv")
    (tmp_path / "folder").mkdir()
    code = main(["run", "--model", DEIT, "--metrics", "macs", *flags])
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, message)
    assert "runs in sweep" not in out and csv.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.csv", "folder", "r.csv"]


def test_an_outcomes_folder_that_is_a_file_is_refused_before_any_model(
    assert_one_line_error, tmp_path, monkeypatch, capsys
):
    (tmp_path / "r.outcomes").write_text("keep me")
    monkeypatch.setattr(
        "ppt_bench.sweeps.grid.describe_vit", lambda *a: pytest.fail("read a model")
    )
    code = main(["run", "--model", DEIT, "--out", str(tmp_path / "r.csv"), "--no-report"])
    assert_one_line_error(code, capsys.readouterr().err, "r.outcomes is a file, not a folder")
    assert (tmp_path / "r.outcomes").read_text() == "keep me"


# A sweep name one byte too long for the longest file it names: with a report, its throughput
# plot (<name>-throughput.png); without, its outcomes folder (<name>.outcomes).
LONG_NAMES = {"report": ([], "-throughput.png"), "no report": (["--no-report"], ".outcomes")}


@pytest.mark.parametrize("case", LONG_NAMES, ids=list(LONG_NAMES))
def test_a_sweep_name_too_long_for_one_of_its_files_is_refused_before_any_run(
    assert_one_line_error, case, tmp_path, monkeypatch, capsys
):
    flags, longest = LONG_NAMES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("ppt_bench.runners.local.run_one", lambda *a: pytest.fail("ran"))
    most = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "s" * (most - len(longest) + 1)
    code = main(["run", "--model", DIGITS, "--metrics", "tokens", "--sweep-name", name, *flags])
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, f"is {most + 1} bytes long, and the file system allows {most}")
    assert "--sweep-name's" in err and "runs in sweep" not in out
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_name_as_long_as_its_files_allow_runs_and_reports(tmp_path, monkeypatch):
    """The results file's temporary twin (``.<name>.csv.<random>.tmp``) is longer than the
    file itself: a name that fits every file a sweep writes fits it too."""
    monkeypatch.chdir(tmp_path)
    name = "s" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len("-throughput.png"))
    args = ["run", "--model", DIGITS, "--metrics", "tokens", "--sweep-name", name, "--quiet"]
    args += ["--batch-size", "2", "--n-images", "2", "--workers", "0"]
    assert main(args) == 0
    assert len(read_results(tmp_path / "results" / f"{name}.csv")) > 0
    assert (tmp_path / "reports" / f"{name}.md").is_file()


REPORT_INPUTS_AND_OUTPUTS = {
    "out is the csv": (["r.csv", "--out", "r.csv"], "--out r.csv is the results file r.csv"),
    "out is one of the csvs": (["r.csv", "s.csv", "--out", "./s.csv"], "is the results file"),
    "out is a folder": (["r.csv", "--out", "folder"], "--out folder is a folder"),
    "out under a file": (["r.csv", "--out", "r.csv/r.md"], "r.csv is a file, not a folder"),
    "binary csv": (["bin.csv", "--out", "r.md"], "bin.csv is not a ppt-bench results CSV"),
    "folder as csv": (["folder", "--out", "r.md"], "results file folder is a folder"),
    "csv of another tool": (["other.csv", "--out", "r.md"], "pass a CSV written by ppt-bench run"),
}


@pytest.mark.parametrize("case", REPORT_INPUTS_AND_OUTPUTS, ids=list(REPORT_INPUTS_AND_OUTPUTS))
def test_report_refuses_bad_inputs_and_outputs_in_one_line(
    assert_one_line_error, case, tmp_path, monkeypatch, capsys
):
    args, message = REPORT_INPUTS_AND_OUTPUTS[case]
    monkeypatch.chdir(tmp_path)
    csvs = [results_csv(tmp_path / "r.csv"), results_csv(tmp_path / "s.csv")]
    before = [p.read_text() for p in csvs]
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "folder").mkdir()
    assert_one_line_error(main(["report", *args]), capsys.readouterr().err, message)
    assert [p.read_text() for p in csvs] == before
    assert not (tmp_path / "r.md").exists() and not list(tmp_path.glob("*.png"))
    assert not (tmp_path / "reports").exists() and not list((tmp_path / "folder").iterdir())


def test_bad_timing_variable_stops_the_sweep_before_it_starts(
    assert_one_line_error, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PPT_BENCH_ITERS", "abc")
    out = tmp_path / "r.csv"
    code = main(["run", "--model", DEIT, "--metrics", "throughput", "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, "PPT_BENCH_ITERS must be an integer")
    assert not out.exists()


def test_quiet_hides_every_progress_bar(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("PPT_BENCH_QUIET", raising=False)  # set by --quiet for Ray workers too
    flags = ["--model", "vit_digits_patch4_32", "--method", "ppt", "--metrics", "accuracy"]
    flags += ["--data", "synthetic", "--n-images", "2", "--batch-size", "2", "--workers", "0"]
    code = main(["run", *flags, "--out", str(tmp_path / "r.csv"), "--no-report", "--quiet"])
    assert code == 0
    assert capfd.readouterr().err == ""
    assert "PPT_BENCH_QUIET" not in os.environ  # set for the run only


def test_list_limit_must_be_positive(assert_one_line_error, capsys):
    for limit in ("0", "-2"):
        code = main(["list", "--models", "deit*", "--limit", limit])
        assert_one_line_error(code, capsys.readouterr().err, "--limit must be a positive integer")


def test_console_script_reports_user_errors_in_one_line(tmp_path):
    script = Path(sys.executable).with_name("ppt-bench")
    exe = [str(script)] if script.exists() else [shutil.which("ppt-bench") or "ppt-bench"]
    out = tmp_path / "r.csv"
    proc = subprocess.run(
        [*exe, "run", "--model", DEIT, "--method", "nosuch", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ppt-bench: error: unknown method 'nosuch'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_list_shows_methods_with_parameters_and_descriptions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list_methods():
        assert name in out and get_method_class(name).description in out
    assert "threshold=7e-05" in out and "locations=[3, 6, 9]" in out


def test_list_models_shows_patchable_vits_only(capsys):
    assert main(["list", "--models", "deit_tiny*"]) == 0
    out = capsys.readouterr().out
    assert "deit_tiny_patch16_224" in out and "deit_tiny_distilled_patch16_224" in out
    assert main(["list", "--models", "resnet1*"]) == 2
    assert "no timm ViT the patch supports" in capsys.readouterr().err


def test_report_command(tmp_path, capsys):
    csv = tmp_path / "x.csv"
    for method, gmacs in (("baseline", 1.0), ("ppt", 0.7)):
        spec = RunSpec(DEIT, method, metrics=("macs",))
        append_rows(csv, make_rows(spec, {"gmacs": gmacs, "agreement_top1": 99.0}))
    out = tmp_path / "rep" / "x.md"
    assert main(["report", str(csv), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out}" in printed and "x-pareto.png" in printed
    assert "| ppt " in out.read_text()
    assert main(["report", str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    notes = tmp_path / "notes.md"
    notes.write_text("ppt falls short of its ideal speedup because of the patch embedding.\n")
    assert main(["report", str(csv), "--out", str(out), "--notes", str(notes)]) == 0
    text = out.read_text()
    assert f"--notes {notes}`" in text.splitlines()[2]
    assert "## Notes\n\nppt falls short of its ideal speedup" in text
    assert main(["report", str(csv), "--out", str(out), "--notes", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("ppt-bench: error: notes file")


def test_delegated_commands_run_their_module(monkeypatch, capsys):
    module = types.ModuleType("ppt_bench.fakecmd")

    def add_arguments(parser):
        parser.add_argument("--code", type=int, default=0)

    def run(args):
        if args.code < 0:
            raise cli.UserError("negative code")
        return args.code

    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "ppt_bench.fakecmd", module)
    monkeypatch.setitem(cli.DELEGATED, "fakecmd", ("ppt_bench.fakecmd", "a test command"))
    monkeypatch.setitem(cli.DELEGATED, "nosuchcmd", ("ppt_bench.nosuchcmd", "not installed"))
    assert main(["fakecmd", "--code", "3"]) == 3
    assert main(["fakecmd", "--code", "-1"]) == 2
    assert main(["fakecmd", "--bogus"]) == 2
    assert main(["nosuchcmd"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "ppt-bench: error: negative code"
    assert err[1].startswith("ppt-bench: error: unrecognized arguments: --bogus")
    assert (
        err[2] == "ppt-bench: error: the 'nosuchcmd' command is not available in this installation"
    )


def test_help_imports_no_subcommand_module_no_torch_and_no_ray():
    code = (
        "import sys\n"
        "from ppt_bench.cli import main\n"
        "assert main(['--help']) == 0\n"
        "assert main(['run', '--help']) == 0\n"
        "heavy = [m for m in ('ppt_bench.engine.train', 'ppt_bench.commands.train',"
        " 'ppt_bench.commands.visualize',"
        " 'ppt_bench.commands.demo', 'torch', 'timm', 'ray', 'ppt_bench.runners.ray_tune')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("list", "run", "report", "demo", "train", "visualize"):
        assert name in proc.stdout


def test_dtype_and_compile_flags_repeat_into_grid_axes():
    args = cli.build_parser().parse_args(
        [
            "run",
            "--model",
            DEIT,
            "--dtype",
            "bf16",
            "--dtype",
            "fp16",
            "--compile",
            "--compile",
            "cudagraph",
        ]
    )
    overrides = cli._overrides(args)
    assert overrides["dtype"] == ["bf16", "fp16"]
    assert overrides["compile"] == ["default", "cudagraph"]
    assert cli._overrides(cli.build_parser().parse_args(["run"]))["compile"] is None
