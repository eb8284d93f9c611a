"""The Ray runner's private instance, its experiments and its errors.

One sweep runs through the CLI in a subprocess with the runner's own private Ray instance:
while it runs, every socket its processes listen on is read with ``ss`` and the GCS is asked
for data with a wrong token and with none; then a SIGINT stops it. The same grid then runs
with another ``--out``. Bad addresses and storage folders are refused before Ray starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppt_bench.cli import main
from ppt_bench.results.records import read_results

pytest.importorskip("ray.tune")

DIGITS = "vit_digits_patch4_32"
# 8 runs of a few milliseconds each; Ray's start and trial overhead make the sweep last long
# enough to be read while it runs and interrupted before it ends.
GRID = [
    "--model", DIGITS, "--method", "merge", "--sweep", f"r={list(range(1, 8))}",
    "--metrics", "tokens", "--data", "synthetic", "--n-images", "2", "--batch-size", "2",
    "--workers", "0", "--sweep-name", "raytest", "--no-report", "--quiet", "--runner", "ray",
]  # fmt: skip
RUNS = 8  # 7 merge runs and the baseline
INTERRUPTED = (
    "ppt-bench: interrupted within one batch or timed round; finished runs are kept in the "
    "results file"
)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
STALE_TOKEN = "a-token-left-by-another-cluster"
FIRST_RUN_TIMEOUT_S = 300  # Ray's start and the first trial on a slow, shared machine
EXIT_TIMEOUT_S = 120


@dataclasses.dataclass
class Sweep:
    """What was seen of the interrupted sweep."""

    returncode: int
    stderr: str
    out: Path
    storage: Path
    home: Path
    listening: set[tuple[str, str]]  # (address, process name)
    auth_errors: dict[str, str]  # which token -> what the GCS answered
    token_source: dict[str, str]  # the GCS's RAY_AUTH_MODE and whether RAY_AUTH_TOKEN is stale
    processes: dict[int, str]  # pid -> start time of every process of the sweep


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (to tell it from a later one with its pid), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(root: int) -> dict[int, str]:
    """``root`` and every process below it, from /proc: pid -> start time."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if (started := start_time(pid)) is not None:
            found[pid] = started
        todo.extend(children.get(pid, []))
    return found


def listening(pids: set[int]) -> set[tuple[str, str, int]]:
    """(local address, process name, pid) of every TCP or UDP socket of ``pids`` listening."""
    text = subprocess.run(
        ["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True, text=True, check=True
    ).stdout
    found = set()
    for line in text.splitlines():
        fields = line.split()
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
            if int(pid) in pids:
                found.add((fields[4] if fields[0] in ("tcp", "udp") else fields[3], name, int(pid)))
    return found


def host(address: str) -> str:
    """The host of ``HOST:PORT`` or ``[HOST]:PORT``, without a ``%interface`` suffix."""
    return address.rsplit(":", 1)[0].strip("[]").split("%")[0]


def gcs_answer(address: str, env: dict[str, str]) -> str:
    """What the GCS at ``address`` answers a read from a client with the given auth settings."""
    code = (
        "import sys\nfrom ray._raylet import GcsClient\n"
        "try:\n    GcsClient(address=sys.argv[1]).internal_kv_get(b'k', None, timeout=10)\n"
        "except Exception as e:\n    print(type(e).__name__, e)\nelse:\n    print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=60
    )
    return proc.stdout.strip()


def runner_check(address: str, env: dict[str, str]) -> str:
    """What the runner's check of a cluster's token says, run with ``env``."""
    code = (
        "import sys\nfrom ppt_bench.core.errors import UserError\n"
        "from ppt_bench.runners.ray_tune import check_token\n"
        "try:\n    check_token(sys.argv[1])\nexcept UserError as e:\n    print(e)\n"
        "else:\n    print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=60
    )
    return proc.stdout.strip() + proc.stderr.strip()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory) -> Sweep:
    """The grid on the runner's private Ray instance, read while it runs, then sent SIGINT.

    The sweep runs with a HOME whose ``~/.ray/auth_token`` is a stale token, and without the
    settings the tests' own Ray instances get (conftest.py), so the runner has to keep its
    instance on loopback and make its own token.
    """
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read the listening sockets")
    folder = tmp_path_factory.mktemp("ray-sweep")
    out, storage, home = folder / "a.csv", folder / "tune", folder / "home"
    log = folder / "stderr.txt"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(STALE_TOKEN)
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env["HOME"] = str(home)
    command = [sys.executable, "-m", "ppt_bench.cli", "run", *GRID]
    command += ["--out", str(out), "--ray-storage", str(storage)]
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,  # SIGINT goes to the whole group, as Ctrl-C in a terminal
        )  # fmt: skip
    seen: set[tuple[str, str, int]] = set()
    processes: dict[int, str] = {}
    auth_errors: dict[str, str] = {}
    token_source: dict[str, str] = {}
    try:
        deadline = time.monotonic() + FIRST_RUN_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            processes |= descendants(proc.pid)
            seen |= listening(set(processes))
            gcs = [(a, pid) for a, name, pid in seen if name == "gcs_server"]
            if gcs and not auth_errors:
                listen, pid = gcs[0]
                address = f"127.0.0.1:{listen.rsplit(':', 1)[1]}"
                gcs_env = environ_of(pid)
                token_source["mode"] = gcs_env.get("RAY_AUTH_MODE", "")
                token = gcs_env.get("RAY_AUTH_TOKEN", "")
                token_source["token"] = "stale" if token == STALE_TOKEN else "own" if token else ""
                client = {k: v for k, v in env.items() if k != "HOME"}
                auth_errors["wrong"] = gcs_answer(
                    address, {**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": STALE_TOKEN}
                )
                auth_errors["none"] = gcs_answer(address, {**client, "RAY_AUTH_MODE": "disabled"})
                # A driver joining with the stale ~/.ray/auth_token.
                auth_errors["runner"] = runner_check(address, {**env, "RAY_AUTH_MODE": "token"})
                auth_errors["right"] = gcs_answer(
                    address, {**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
                )
            workers = any(name.startswith("ray::") for _, name, _ in seen)
            rows = out.read_text().count("\n") - 1 if out.exists() else 0
            if workers and auth_errors and rows > 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no run finished in {FIRST_RUN_TIMEOUT_S} s: {log.read_text()}")
        processes |= descendants(proc.pid)
        seen |= listening(set(processes))
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (home / ".ray" / "auth_token").read_text() == STALE_TOKEN  # neither used nor replaced
    return Sweep(
        proc.returncode, log.read_text(), out, storage, home,
        {(address, name) for address, name, _ in seen}, auth_errors, token_source, processes,
    )  # fmt: skip


@pytest.mark.slow
def test_private_instance_listens_on_loopback_only(interrupted_sweep):
    names = {name for _, name in interrupted_sweep.listening}
    assert {"gcs_server", "raylet"} <= names
    assert any(name.startswith("ray::") for name in names)  # the trials' workers
    print("listening:", sorted(interrupted_sweep.listening))
    elsewhere = sorted(s for s in interrupted_sweep.listening if host(s[0]) not in LOOPBACK)
    assert not elsewhere, f"listening beyond loopback: {elsewhere}"


@pytest.mark.slow
def test_private_instance_takes_only_its_own_generated_token(interrupted_sweep):
    assert interrupted_sweep.token_source == {"mode": "token", "token": "own"}
    answers = interrupted_sweep.auth_errors
    assert answers["right"] == "ok"
    for which in ("wrong", "none"):
        assert answers[which].startswith("AuthenticationError"), (which, answers[which])
        assert "InvalidAuthToken" in answers[which]


@pytest.mark.slow
def test_a_cluster_refusing_the_token_is_one_line_at_once(interrupted_sweep):
    """What ppt-bench says to a driver whose ~/.ray/auth_token is another cluster's (ray.init
    would retry); its stderr is empty but for that line."""
    answer = interrupted_sweep.auth_errors["runner"]
    assert answer.startswith("the Ray cluster at --ray-address 127.0.0.1:"), answer
    assert "refused this machine's token (InvalidAuthToken)" in answer
    assert len(answer.splitlines()) == 1


@pytest.mark.slow
def test_ctrl_c_stops_the_trials_and_exits_130(interrupted_sweep):
    assert interrupted_sweep.returncode == 130, interrupted_sweep.stderr
    assert interrupted_sweep.stderr.strip().splitlines()[-1] == INTERRUPTED
    df = read_results(interrupted_sweep.out)
    assert set(df["status"]) == {"ok"}  # no run recorded as failed by the interrupt
    assert 1 <= df["run_id"].nunique() < RUNS

    def alive() -> list[int]:
        return [p for p, t in interrupted_sweep.processes.items() if start_time(p) == t]

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(), "Ray processes of the sweep still run after it exited"


@pytest.mark.slow
def test_another_out_never_restores_or_writes_the_interrupted_experiment(
    interrupted_sweep, tmp_path, monkeypatch
):
    """The same grid, interrupted while writing a.csv, then run with --out b.csv."""
    from ray import tune

    restores = []
    restore = tune.Tuner.restore
    monkeypatch.setattr(
        tune.Tuner,
        "restore",
        classmethod(lambda cls, *a, **k: restores.append(a) or restore(*a, **k)),
    )
    a = interrupted_sweep.out
    before = a.read_bytes()
    auth_env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    b = tmp_path / "b.csv"
    args = ["run", *GRID, "--out", str(b), "--ray-storage", str(interrupted_sweep.storage)]
    assert main(args) == 0
    assert restores == []
    assert a.read_bytes() == before
    assert read_results(b)["run_id"].nunique() == RUNS
    assert len(list(interrupted_sweep.storage.iterdir())) == 2  # one experiment per results file
    # The private instance is gone and left this process as it found it.
    import ray

    assert not ray.is_initialized()
    assert {k: os.environ.get(k) for k in auth_env} == auth_env


# Cheap checks: each is refused before Ray starts.
SMALL = [
    "--model", DIGITS, "--method", "merge", "--param", "r=2", "--metrics", "tokens",
    "--data", "synthetic", "--n-images", "2", "--workers", "0", "--no-report", "--quiet",
    "--runner", "ray",
]  # fmt: skip


def refused(capsys, args) -> str:
    """Run the CLI, check it refused with exit 2 and one line, and return the line."""
    import ray

    assert main(["run", *SMALL, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppt-bench: error: "), err
    assert not ray.is_initialized()
    return err[0]


@pytest.mark.parametrize("address", ["x y", "host:6379:1", "host:port", "host:0", ":6379"])
def test_a_malformed_address_is_refused_before_ray_starts(address, tmp_path, capsys):
    out = tmp_path / "r.csv"
    line = refused(capsys, ["--ray-address", address, "--out", str(out)])
    assert "--ray-address must be HOST:PORT" in line and repr(address) in line
    assert not out.exists()


def test_a_malformed_ray_address_variable_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    line = refused(capsys, ["--out", str(tmp_path / "r.csv")])
    assert "RAY_ADDRESS must be HOST:PORT" in line


def test_an_unreachable_address_fails_within_seconds(tmp_path):
    command = [sys.executable, "-m", "ppt_bench.cli", "run", *SMALL, "--ray-address"]
    command += ["127.0.0.1:1", "--out", str(tmp_path / "r.csv")]
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ppt-bench: error: no Ray cluster answers at --ray-address 127.0.0.1:1 (connection "
        "refused): start it with `ray start --head --port=PORT` or fix the address"
    ]
    assert "runs in sweep" not in proc.stdout  # refused before the sweep starts
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_an_unwritable_storage_folder_is_refused_before_any_trial(where, tmp_path, capsys):
    if where == "under a file":
        (tmp_path / "f").write_text("")
        storage = tmp_path / "f" / "tune"
    else:
        storage = Path("/proc") / f"ppt-bench-{os.getpid()}"
    out = tmp_path / "r.csv"
    line = refused(capsys, ["--ray-storage", str(storage), "--out", str(out)])
    assert f"--ray-storage {storage}" in line
    assert not out.exists() and not storage.exists()


@pytest.mark.slow  # Ray's GCS client waits its 3 x 5 s before it gives up
def test_an_address_where_something_else_listens_fails_within_seconds(tmp_path, capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts, never speaks gRPC
        address = f"127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        line = refused(capsys, ["--ray-address", address, "--out", str(tmp_path / "r.csv")])
    assert line == (
        f"ppt-bench: error: no Ray cluster answers at --ray-address {address} (something else "
        "listens there): pass the head node's GCS port (ray start --head --port=PORT)"
    )
    assert time.monotonic() - start < 60


def test_a_trial_uses_the_outcomes_folder_only_where_the_driver_marked_it(tmp_path):
    import numpy as np
    import torch

    from ppt_bench.measure.outcomes import Outcomes, Reference
    from ppt_bench.runners.ray_tune import DRIVER_FILE, TrialStore

    folder = tmp_path / "r.outcomes"
    outcomes = Outcomes(*(np.zeros(3, dtype) for dtype in (int, int, bool, float, int, float)))
    elsewhere = TrialStore(folder, "token")  # another node: no mark of this sweep there
    elsewhere.save_outcomes("run", outcomes)
    elsewhere.save_reference("key", Reference(torch.zeros(3, 2), torch.zeros(3, dtype=int)))
    assert not folder.exists() and elsewhere.outcomes  # sent back with the rows instead
    folder.mkdir()
    (folder / DRIVER_FILE).write_text("an earlier sweep")
    assert not TrialStore(folder, "token").shared
    (folder / DRIVER_FILE).write_text("token")
    here = TrialStore(folder, "token")
    here.save_outcomes("run", outcomes)
    assert here.shared and not here.outcomes and here.load_outcomes("run") is not None
