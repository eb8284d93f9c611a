"""Results that cannot be mixed up or lost: experiment identity, safe writes, inputs refused
before any work."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ppt_bench.cli import main
from ppt_bench.core import identity
from ppt_bench.core.errors import MethodError, UserError
from ppt_bench.methods import create_method
from ppt_bench.models import build as models
from ppt_bench.results.records import (
    IDENTITY_COLUMNS,
    INTERVAL_COLUMNS,
    append_rows,
    finished_run_ids,
    make_rows,
    read_results,
)
from ppt_bench.results.report import write_report
from ppt_bench.results.spec import RunSpec
from ppt_bench.sweeps.config import build_config
from ppt_bench.sweeps.grid import expand, make_spec

DIGITS = "vit_digits_patch4_32"


def test_runs_on_other_weights_are_other_runs_and_never_averaged(tmp_path):
    """Runs that were averaged into one baseline before: one run with trained
    weights, one without, in the same file."""
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    trained = RunSpec(DIGITS, checkpoint=str(ckpt), checkpoint_sha256=identity.file_digest(ckpt))
    untrained = RunSpec(DIGITS)
    assert trained.run_id != untrained.run_id
    path = tmp_path / "r.csv"
    append_rows(path, make_rows(trained, {"top1": 96.9}, dataset="digits", n_images=32))
    append_rows(path, make_rows(untrained, {"top1": 15.6}, dataset="digits", n_images=32))
    df = read_results(path)
    assert set(df["checkpoint_sha256"].fillna("")) == {identity.file_digest(ckpt), ""}
    text = write_report(path, tmp_path / "r.md").markdown.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| baseline")]
    assert len(rows) == 2 and "96.90" in text and "15.60" in text
    assert "56.25" not in text  # their mean


def test_accuracy_over_different_image_counts_is_refused_by_the_report(tmp_path):
    path = tmp_path / "r.csv"
    for n, top1 in ((32, 90.0), (360, 97.0)):
        spec = RunSpec(DIGITS, data="digits", n_images=n)
        append_rows(path, make_rows(spec, {"top1": top1}, dataset="digits", n_images=n))
    with pytest.raises(UserError, match=r"measured on 32 and 360 images \(column n_images\)"):
        write_report(path, tmp_path / "r.md")


def test_a_data_set_or_checkpoint_that_changes_changes_the_run_id(tmp_path):
    data = tmp_path / "data" / "cls"
    data.mkdir(parents=True)
    (data / "a.png").write_bytes(b"1")
    before = identity.data_fingerprint(str(tmp_path / "data"))
    (data / "b.png").write_bytes(b"2")
    assert identity.data_fingerprint(str(tmp_path / "data")) != before
    config = build_config(overrides={"models": [DIGITS], "data": str(tmp_path / "data")})
    first = expand(config)[0]
    os.utime(data / "a.png", ns=(1, 1))  # touched: another file list
    assert expand(config)[0].run_id != first.run_id
    assert first.machine == identity.machine() and first.data_fingerprint


def test_an_unnamed_sweep_is_named_after_what_it_runs():
    config = build_config(overrides={"models": [DIGITS], "data": "digits"}, methods=["ppt"])
    assert config.sweep_name == f"{DIGITS}-ppt-digits"
    assert str(config.out_path) == f"results/{DIGITS}-ppt-digits.csv"


def _rows(run: str, status: str = "ok") -> list[dict]:
    spec = make_spec(DIGITS, params={"r": int(run)}, method="merge")
    return make_rows(spec, {"gmacs": 1.0}, status=status)


def test_a_last_line_without_newline_is_completed_and_a_cut_one_refused(tmp_path):
    path = tmp_path / "r.csv"
    append_rows(path, _rows("1"))
    path.write_text(path.read_text().rstrip("\n"))  # an editor dropped the final newline
    append_rows(path, _rows("2"))
    assert len(read_results(path)) == 2
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # a copy cut short mid-row
    with pytest.raises(UserError, match=r"line 3, has \d+ fields where the header has \d+"):
        append_rows(path, _rows("3"))
    assert path.read_text() == text[: len(text) - 40]
    with pytest.raises(UserError, match="line 3"):
        read_results(path)


def test_a_malformed_results_file_is_one_line_in_report_and_run(
    assert_one_line_error, tmp_path, capsys
):
    path = tmp_path / "r.csv"
    append_rows(path, _rows("1"))
    append_rows(path, _rows("2"))
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace(",", ",,", 1)
    path.write_text("".join(lines))
    code = main(["report", str(path), "--out", str(tmp_path / "r.md")])
    assert_one_line_error(code, capsys.readouterr().err, "line 2, has")
    code = main(["run", "--model", DIGITS, "--metrics", "macs", "--out", str(path), "--no-report"])
    assert_one_line_error(code, capsys.readouterr().err, "line 2, has")


WRITER = """
import json, sys
from ppt_bench.results.records import append_rows

path, runs = sys.argv[1], json.load(open(sys.argv[2]))
for rows in runs:  # each run's rows as a runner appends them
    append_rows(path, rows)
"""


def test_two_processes_writing_one_file_lose_and_repeat_nothing(tmp_path):
    """20 rounds: two writers at once, each with 10 runs of its own and 10 that both ran."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    runs = [
        make_rows(RunSpec(DIGITS, "merge", {"r": r}), {"gmacs": 1.0, "param_count": 2.0})
        for r in range(30)
    ]
    for part, (a, b) in enumerate(((0, 20), (10, 30))):
        (tmp_path / f"runs{part}.json").write_text(json.dumps(runs[a:b]))
    for round_ in range(20):
        path = tmp_path / f"r{round_}.csv"
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(path), str(tmp_path / f"runs{i}.json")]
            )
            for i in (0, 1)
        ]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        df = read_results(path)
        assert (df.groupby("run_id").size() == 2).all()  # every run once: its two rows
        assert sorted(df["r"].unique()) == list(range(30))  # no run lost


def test_a_run_already_recorded_is_not_written_twice(tmp_path):
    path = tmp_path / "r.csv"
    assert append_rows(path, _rows("1"))
    assert not append_rows(path, _rows("1"))
    assert not append_rows(path, _rows("1", status="failed"))
    assert len(read_results(path)) == 1 and len(finished_run_ids(path)) == 1


def test_a_switch_given_as_text_is_refused():
    with pytest.raises(MethodError, match="prop_attn must be true or false, got 'false'"):
        create_method("merge", prop_attn="false")
    with pytest.raises(MethodError, match="fuse must be true or false"):
        create_method("evit", fuse=1)


def test_weights_are_checked_once_before_the_sweep(
    assert_one_line_error, tmp_path, monkeypatch, capsys
):
    ckpt = tmp_path / "w.pth"
    torch.save({"head.weight": torch.zeros(3, 7)}, ckpt)  # fits no digits model
    reads = []
    real = models.read_checkpoint
    monkeypatch.setattr(models, "read_checkpoint", lambda c: reads.append(c) or real(c))
    args = ["run", "--model", DIGITS, "--method", "ppt", "--sweep", "r=[2,4,8]", "--metrics"]
    args += ["macs", "--checkpoint", str(ckpt), "--out", str(tmp_path / "r.csv")]
    assert_one_line_error(main(args), capsys.readouterr().err, "does not fit")
    assert reads == [str(ckpt)] and not (tmp_path / "r.csv").exists()


def test_a_pretrained_tag_without_a_hub_fails_once_before_the_sweep(
    assert_one_line_error, tmp_path, monkeypatch, capsys
):
    tries = []

    def offline(name, pretrained, num_classes):
        tries.append(name)
        raise UserError(f"could not download pretrained weights for {name!r} (OSError)")

    monkeypatch.setattr(models, "_create", offline)
    args = ["run", "--model", "deit_tiny_patch16_224.fb_in1k", "--method", "ppt", "--sweep"]
    args += ["r=[2,4]", "--metrics", "macs", "--out", str(tmp_path / "r.csv")]
    assert_one_line_error(
        main(args), capsys.readouterr().err, "could not download pretrained weights"
    )
    assert tries == ["deit_tiny_patch16_224.fb_in1k"]


def test_report_does_not_overwrite_a_file_it_did_not_write(assert_one_line_error, tmp_path, capsys):
    path = tmp_path / "r.csv"
    append_rows(path, _rows("1"))
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    code = main(["report", str(path), "--out", str(notes)])
    assert_one_line_error(code, capsys.readouterr().err, "exists and is not a ppt-bench report")
    assert notes.read_text() == "# my notes\n"
    report = tmp_path / "r.md"
    assert main(["report", str(path), "--out", str(report)]) == 0
    assert main(["report", str(path), "--out", str(report)]) == 0  # its own report: rewritten


def test_demo_name_cannot_leave_the_results_folder(
    assert_one_line_error, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(
        "ppt_bench.engine.demo_model.load_or_train", lambda **k: pytest.fail("trained")
    )
    code = main(["demo", "--results-dir", str(tmp_path), "--name", "../../x"])
    assert_one_line_error(code, capsys.readouterr().err, "--name '../../x' must be a file stem")
    assert not (tmp_path.parent.parent / "x.csv").exists()


@pytest.mark.parametrize(
    ("flag", "value"), [("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "nan")]
)
def test_non_finite_training_settings_are_refused(
    assert_one_line_error, flag, value, tmp_path, capsys
):
    out = tmp_path / "w.pth"
    code = main(["train", flag, value, "--epochs", "1", "--device", "cpu", "--out", str(out)])
    setting = flag.removeprefix("--").replace("-", "_")
    assert_one_line_error(code, capsys.readouterr().err, f"{setting} must be a finite number")
    assert not out.exists()


def test_a_diverging_training_stops_and_keeps_the_last_checkpoint(
    logits, tmp_path, monkeypatch, capsys
):
    from ppt_bench.engine import train

    out = tmp_path / "w.pth"
    out.write_bytes(b"the last good checkpoint")
    real = train._make_loop

    def nan_loss(*args, **kwargs):
        loop = real(*args, **kwargs)
        loop.criterion = lambda logits, y: logits.sum() * float("nan")
        return loop

    monkeypatch.setattr(train, "_make_loop", nan_loss)
    argv = ["train", "--epochs", "1", "--device", "cpu", "--batch-size", "64", "--out", str(out)]
    code, err = main(argv), capsys.readouterr().err
    last = err.split("\r")[-1].splitlines()[-1]  # after the training progress bar
    assert code == 2 and last.startswith("ppt-bench: error: training diverged: the loss became nan")
    assert out.read_bytes() == b"the last good checkpoint"
    assert Path(out).stat().st_size == len(b"the last good checkpoint")


def test_a_results_file_from_before_the_identity_columns_reads_reports_and_grows(tmp_path):
    path = tmp_path / "old.csv"
    append_rows(path, _rows("1"))
    earlier = [*IDENTITY_COLUMNS, *INTERVAL_COLUMNS]  # the earlier schema lacks them
    read_results(path).drop(columns=earlier).to_csv(path, index=False)
    assert "machine" not in path.read_text().splitlines()[0]
    assert "ci_low" not in path.read_text().splitlines()[0]
    text = write_report(path, tmp_path / "r.md").markdown.read_text()
    assert "| merge" in text and "## Where it ran" in text
    append_rows(path, _rows("2"))  # the file gains the columns; the old row keeps blanks
    df = read_results(path)
    assert list(df["machine"].fillna("")) == ["", identity.machine()]
    assert {"ci_low", "ci_high"} <= set(df.columns)


def _report(path: Path, *more: Path) -> list[str]:
    return ["report", str(path), *map(str, more), "--out", str(path.with_suffix(".md"))]


def test_two_rows_of_one_run_with_other_values_are_one_line(
    assert_one_line_error, tmp_path, capsys
):
    path, other = tmp_path / "r.csv", tmp_path / "other.csv"
    append_rows(path, _rows("1"))
    append_rows(other, _rows("1"))
    assert main(_report(path, other)) == 0  # the same run twice, the same figures: one run
    lines = other.read_text().splitlines(keepends=True)
    other.write_text(lines[0] + lines[1].replace(",gmacs,1.0,", ",gmacs,2.5,"))
    code = main(_report(path, other))
    assert_one_line_error(code, capsys.readouterr().err, "has two values of gmacs: 1.0 in")
    with path.open("a") as f:  # the same file given it twice
        f.write(lines[1].replace(",gmacs,1.0,", ",gmacs,2.5,"))
    code = main(_report(path))
    assert_one_line_error(code, capsys.readouterr().err, f"1.0 in {path} line 2 and 2.5 in {path}")


@pytest.mark.parametrize(
    ("column", "cell", "message"),
    [
        ("params", "r=1", "params cell 'r=1' is not a JSON object"),
        ("params", "[1, 2]", "params cell '[1, 2]' is not a JSON object"),
        ("n_images", "many", "n_images cell 'many' is not a number"),
        ("batch_size", "64x", "batch_size cell '64x' is not a number"),
    ],
)
def test_a_hand_edited_cell_is_one_line_in_report_and_at_the_end_of_run(
    assert_one_line_error, column, cell, message, tmp_path, capsys
):

    path = tmp_path / "r.csv"
    append_rows(path, _rows("1"))
    append_rows(path, _rows("2"))
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows[1][column] = cell
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    code = main(_report(path))
    assert_one_line_error(code, capsys.readouterr().err, f"line 3: its {message}")
    args = ["run", "--model", DIGITS, "--metrics", "macs", "--out", str(path), "--quiet"]
    code = main([*args, "--report", str(tmp_path / "end.md")])
    assert_one_line_error(code, capsys.readouterr().err, message)
    assert len(path.read_text().splitlines()) == 1 + 2 + 4  # the new run's four rows kept
