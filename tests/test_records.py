"""The tidy results CSV: schema, read-back types, and no loss when a writer is killed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ppt_bench.core import atomic
from ppt_bench.core.errors import UserError
from ppt_bench.results.records import (
    COLUMNS,
    append_rows,
    finished_run_ids,
    make_rows,
    read_results,
    unit_of,
)

METRICS_PER_RUN = 150

WRITER = textwrap.dedent(
    f"""
    import sys, time
    from ppt_bench.results.records import append_rows, make_rows
    from ppt_bench.results.spec import RunSpec

    path, pause = sys.argv[1], float(sys.argv[2])
    for seed in range(100_000):
        spec = RunSpec(model="deit_tiny_patch16_224", method="ppt", params={{"r": 8}}, seed=seed)
        metrics = {{f"tokens_block_{{i}}": float(i) for i in range({METRICS_PER_RUN})}}
        append_rows(path, make_rows(spec, metrics, dataset="synthetic", n_images=4))
        print(spec.run_id, flush=True)
        time.sleep(pause)
    """
)


@pytest.mark.parametrize(("pause", "finished_before_kill"), [(0.05, 3), (0.0, 12)])
def test_killed_writer_leaves_every_finished_run(tmp_path, pause, finished_before_kill):
    """SIGKILL while the writer sleeps between runs, or while it is busy writing them."""
    path = tmp_path / "results.csv"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(pause)],
        stdout=subprocess.PIPE,
        text=True,
    )
    finished = []
    try:
        while len(finished) < finished_before_kill:
            line = proc.stdout.readline()
            assert line, f"writer exited early with code {proc.wait()}"
            finished.append(line.strip())
        time.sleep(pause / 2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    df = read_results(path)
    assert set(finished) <= set(df["run_id"])
    # Only whole runs are in the file: a run killed mid-write is absent, not truncated.
    assert (df.groupby("run_id").size() == METRICS_PER_RUN).all()
    assert set(finished) <= finished_run_ids(path)


def test_rows_follow_the_schema(spec):
    s = spec(method="ppt", params={"r": 8, "locations": [3, 6, 9]}, sweep="demo")
    rows = make_rows(s, {"top1": 71.5, "gmacs": 0.9, "tokens_block_3": 189.0}, dataset="x")
    assert all(set(row) == set(COLUMNS) for row in rows)
    assert [r["metric"] for r in rows] == ["top1", "gmacs", "tokens_block_3"]
    assert [r["unit"] for r in rows] == ["%", "GMACs", "tokens"]
    assert {r["run_id"] for r in rows} == {s.run_id}
    assert rows[0]["locations"] == "[3, 6, 9]" and rows[0]["r"] == 8
    assert rows[0]["params"] == '{"locations": [3, 6, 9], "r": 8}'
    assert unit_of("pooled_frac_block_6") == ""
    with pytest.raises(ValueError):
        unit_of("nonsense")


def test_read_back_keeps_ids_and_versions_as_text(spec, tmp_path):
    path = tmp_path / "r.csv"
    rows = make_rows(spec(), {"gmacs": 1.25})
    rows[0].update(run_id="012345678901", git_sha="000000000123", timm_version="1.10")
    append_rows(path, rows)
    df = read_results(path)
    assert df.loc[0, "run_id"] == "012345678901"
    assert df.loc[0, "git_sha"] == "000000000123"
    assert df.loc[0, "timm_version"] == "1.10"
    assert df.loc[0, "value"] == 1.25
    assert finished_run_ids(path) == {"012345678901"}


def test_failed_runs_are_not_finished(spec, tmp_path):
    path = tmp_path / "r.csv"
    ok, failed = spec(seed=1), spec(seed=2)
    append_rows(path, make_rows(ok, {"gmacs": 1.0}))
    append_rows(path, make_rows(failed, {}, status="failed", error="boom\nsecond line"))
    df = read_results(path)
    assert df.loc[df["run_id"] == failed.run_id, "error"].item() == "boom second line"
    assert finished_run_ids(path) == {ok.run_id}


def test_a_long_error_is_recorded_whole_on_one_line(spec, tmp_path):
    """The error column was cut at 500 characters, mid-word, and the sweep printed it so."""
    error = " ".join(f"word{i}" for i in range(150)) + "\nsecond line"
    row = make_rows(spec(), {}, status="failed", error=error)[0]
    assert row["error"] == error.replace("\n", " ")


def test_appending_to_a_foreign_csv_is_a_user_error(spec, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"not a ppt-bench results CSV.*new file with --out"):
        append_rows(path, make_rows(spec(), {"gmacs": 1.0}))
    with pytest.raises(UserError, match=r"not a ppt-bench results CSV.*written by ppt-bench run"):
        read_results(path)
    with pytest.raises(UserError, match="does not exist"):
        read_results(tmp_path / "missing.csv")


def test_binary_files_and_folders_are_user_errors(spec, tmp_path):
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match=r"bin\.csv is not a ppt-bench results CSV \(not UTF-8"):
        read_results(binary)
    with pytest.raises(UserError, match=r"not UTF-8.*new file with --out"):
        append_rows(binary, make_rows(spec(), {"gmacs": 1.0}))
    with pytest.raises(UserError, match="is a folder; pass a CSV written by ppt-bench run"):
        read_results(tmp_path)
    with pytest.raises(UserError, match="is a folder; write to a new file with --out"):
        finished_run_ids(tmp_path)
    assert binary.read_bytes() == b"\xff\xfe\x00garbage"


def test_a_failed_write_names_the_results_file(spec, tmp_path, monkeypatch):
    path = tmp_path / "r.csv"

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / ".r.csv.x.tmp"))

    with monkeypatch.context() as patched:  # a new file is written whole, then renamed
        patched.setattr(atomic.tempfile, "mkstemp", no_space)
        with pytest.raises(UserError) as err:
            append_rows(path, make_rows(spec(), {"gmacs": 1.0}))
    assert str(err.value).startswith(f"cannot write results file {path} (No space left on")
    assert ".tmp" not in str(err.value) and not path.exists()


def test_an_append_that_fails_half_way_is_cut_back(spec, tmp_path, monkeypatch):
    path = tmp_path / "r.csv"
    append_rows(path, make_rows(spec(), {"gmacs": 1.0}))
    before = path.read_text()
    write = os.write

    def half_then_full(fd, data):
        write(fd, bytes(data[:20]))  # part of the row reached the file
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(os, "write", half_then_full)
        with pytest.raises(UserError, match=f"cannot write results file {path} \\(No space"):
            append_rows(path, make_rows(spec(seed=1), {"gmacs": 1.0}))
    assert path.read_text() == before
    assert append_rows(path, make_rows(spec(seed=1), {"gmacs": 1.0}))  # the next one goes on
    assert len(read_results(path)) == 2


def test_results_file_keeps_its_mode_or_follows_the_umask(spec, tmp_path):
    path = tmp_path / "r.csv"
    umask = os.umask(0o027)
    try:
        append_rows(path, make_rows(spec(), {"gmacs": 1.0}))
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        path.chmod(0o604)
        append_rows(path, make_rows(spec(seed=1), {"gmacs": 1.0}))
        assert stat.S_IMODE(path.stat().st_mode) == 0o604
    finally:
        os.umask(umask)


def test_cpu_rows_name_the_processor():
    from ppt_bench.results.records import cpu_name, environment

    name = environment("cpu")["device_name"]
    assert name.startswith(cpu_name()) and name.endswith(" CPUs)")
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    models = [line for line in lines if line.startswith("model name")]
    if models:  # Linux on x86: the model name, not just the architecture
        assert cpu_name() == models[0].partition(":")[2].strip()


def test_a_results_file_given_as_a_link_is_written_through_to_its_target(
    spec, tmp_path, monkeypatch
):
    """Appends and the rewrite that widens the header both reach the link's target, under the
    lock of the target's folder, and the link stays a link."""
    from ppt_bench.measure.outcomes import store_folder
    from ppt_bench.results import records

    real = tmp_path / "elsewhere" / "all.csv"
    real.parent.mkdir()
    append_rows(real, make_rows(spec(), {"gmacs": 1.0}))
    link = tmp_path / "results" / "mine.csv"
    link.parent.mkdir()
    link.symlink_to(real)
    held = []

    def recorded(path):
        held.append(Path(path))
        return atomic.locked(path)

    monkeypatch.setattr(records, "locked", recorded)
    runs = [
        spec("ppt", {"r": 8, "threshold": 1e-4}),  # no new column: a plain append
        spec("ppt", {"r": 8, "prop_attn": False}),  # a new column: the file is rewritten
        spec("merge", {"r": 4, "prop_attn": False}),
    ]
    for run in runs:
        assert append_rows(link, make_rows(run, {"gmacs": 1.0}))
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert set(read_results(real)["run_id"]) == {spec().run_id, *(r.run_id for r in runs)}
    assert "prop_attn" in real.read_text().splitlines()[0]
    assert held and set(held) == {real.parent.resolve()}
    assert finished_run_ids(link) == finished_run_ids(real)
    assert store_folder(link) == store_folder(real) == real.parent.resolve() / "all.outcomes"
    assert sorted(p.name for p in link.parent.iterdir()) == ["mine.csv"]
