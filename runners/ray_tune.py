"""``RayRunner``: one Ray Tune trial per run, on a local Ray instance or an existing cluster.

Each trial calls the same :func:`~ppt_bench.runners.base.run_one` as the local runner and
reports its rows as one JSON string; a callback on the driver appends them to the results CSV as
each trial finishes, so an interrupted sweep keeps every finished run. Trials that Tune itself
reports as errored (a worker killed for memory, a lost node) become ``status=failed`` rows.

Resuming: the Tune experiment is named after the sweep, a hash of its grid and a hash of the
results file it writes, so the same command finds it again and a command with another ``--out``
never does. An interrupted experiment is restored (``Tuner.restore``); runs already ``ok`` in the
CSV are skipped either way, and anything left over runs in a fresh experiment.

Without a cluster address the runner starts a private Ray instance that listens on loopback
only (every Ray process binds to 127.0.0.1), has no dashboard, and accepts only a token
generated for this instance (Ray's token authentication, configured by its documented
``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN`` variables).

Cancelling (:mod:`ppt_bench.core.cancel`): Tune's own SIGINT handler is switched off
(``TUNE_DISABLE_SIGINT_HANDLER``), so SIGINT and SIGTERM only request a cancellation; a Tune
stopper then stops every trial at Tune's next step, and the sweep raises
:class:`~ppt_bench.core.cancel.Cancelled` with the finished runs in the results file.

Ray offers public settings for most of this (``ray.init``'s arguments, its environment
variables, ``ray.util``, Tune's ``RunConfig``); three things it has no public way to do, and
each private call says so where it is made: keep a new local instance on 127.0.0.1
(:func:`_loopback_only`), read the token settings again in a process that already read them
(:func:`_reload_auth_config`), and ask a cluster's GCS once, with a timeout (:func:`check_token`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray._private import ray_constants  # private: see _loopback_only
from ray._raylet import (  # private: see _reload_auth_config and check_token
    AuthenticationTokenLoader,
    Config,
    InnerGcsClient,
)
from ray.exceptions import AuthenticationError
from ray.tune.stopper import Stopper
from tqdm.auto import tqdm

from ppt_bench.core import cancel
from ppt_bench.core.atomic import atomic_write
from ppt_bench.core.errors import UserError, check_output_path, first_line
from ppt_bench.measure import metrics
from ppt_bench.measure.outcomes import Outcomes, Reference, RunStore, store_folder
from ppt_bench.results.records import append_rows, failed_rows, finished_run_ids
from ppt_bench.results.spec import RunSpec
from ppt_bench.runners.base import SweepSummary, environ, grid_hash, pending, run_one

ROWS_KEY = "ppt_bench_rows"
OUTCOMES_KEY = "ppt_bench_outcomes"  # the run's per-image outcomes, base64 of their .npz
DRIVER_FILE = ".ray-sweep"  # in the outcomes folder: the token of the sweep being run
_DONE_MARKER = ".ppt-bench-complete"
_LABEL = 64  # characters of the sweep's name in its experiment folder's name
# HOST:PORT, HOST a name or an IPv4 address, or an IPv6 address in brackets.
_ADDRESS = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]+)"
)
# Where Tune logs the messages that _TuneInterruptFilter drops.
_TUNE_LOGGERS = ("tune", "analysis.experiment_analysis")
# How long a cluster address may take to accept a connection (or its GCS to answer).
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for.

    Args:
        cpus: CPUs per trial.
        gpu_fraction: GPU share of a CUDA trial that takes no timings (accuracy, MACs, tokens);
            trials timing on CUDA always get a whole GPU.
    """

    cpus: float = 1.0
    gpu_fraction: float = 0.25

    def for_spec(self, spec: dict[str, Any]) -> dict[str, float]:
        """Ray resources of the trial for one spec dict (``RunSpec.to_dict``)."""
        if not str(spec["device"]).startswith("cuda"):
            return {"CPU": self.cpus}
        whole = metrics.timing(spec["metrics"])  # timings need the device to themselves
        return {"CPU": self.cpus, "GPU": 1.0 if whole else self.gpu_fraction}


class TrialStore(RunStore):
    """A trial's view of the sweep's :class:`~ppt_bench.measure.outcomes.RunStore`.

    The driver leaves a file holding a token of this sweep in the folder. A trial that finds it
    there (on the driver's machine, or on a file system shared with it) uses the folder as the
    local runner does: it reads the unreduced model's outputs, or computes them under the
    folder's lock while other trials wait, and writes its per-image outcomes before its rows
    are recorded. A trial that does not find it (another node) keeps the folder untouched,
    computes the outputs for itself and sends its outcomes back with its rows.
    """

    def __init__(self, folder: str | os.PathLike, token: str) -> None:
        super().__init__(folder)
        self.outcomes: bytes = b""
        try:
            self.shared = (self.folder / DRIVER_FILE).read_text() == token
        except OSError:
            self.shared = False

    def load_reference(self, key: str) -> Reference | None:
        return super().load_reference(key) if self.shared else None

    def save_reference(self, key: str, reference: Reference) -> None:
        if self.shared:
            super().save_reference(key, reference)

    def reference_lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        return super().reference_lock(key) if self.shared else contextlib.nullcontext()

    def save_outcomes(self, run_id: str, outcomes: Outcomes) -> None:
        if self.shared:
            super().save_outcomes(run_id, outcomes)
        else:
            self.outcomes = outcomes.to_bytes()


def _trial(
    config: dict[str, Any],
    skip: frozenset[str] = frozenset(),
    progress: bool = True,
    store: str = "",
    token: str = "",
) -> None:
    """The Tune trainable: evaluate one spec and report its rows (and its per-image outcomes
    where it cannot write them beside the results file)."""
    spec = RunSpec.from_dict(config["run"]["spec"])
    trial_store = TrialStore(store, token) if store else None
    rows = [] if spec.run_id in skip else run_one(spec, progress, trial_store)
    outcomes = trial_store.outcomes if trial_store else b""
    tune.report(
        {
            ROWS_KEY: json.dumps(rows, default=str),
            OUTCOMES_KEY: base64.b64encode(outcomes).decode("ascii"),
        }
    )


def _resources(trial_resources: TrialResources) -> Callable[[dict], tune.PlacementGroupFactory]:
    return lambda config: tune.PlacementGroupFactory(
        [trial_resources.for_spec(config["run"]["spec"])]
    )


def _trial_dirname(trial: Any) -> str:
    run = trial.config["run"]
    return f"{run['spec']['method']}-{run['run_id']}"


class RecordRows(tune.Callback):
    """Runs on the driver: appends each finished trial's rows to the results CSV.

    Tune pickles its run config (callbacks included) with the experiment state, so the progress
    bar is created on first use and left out of the pickle.
    """

    def __init__(
        self, out_csv: Path, summary: SweepSummary, total: int, progress: bool = True
    ) -> None:
        self.out_csv = out_csv
        self.summary = summary
        self.total = total
        self.progress = progress
        self.done: set[str] = finished_run_ids(out_csv)
        self._bar: tqdm | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None}

    def record(self, rows: list[dict[str, Any]], outcomes: bytes = b"") -> None:
        """Append one run's rows (after its per-image outcomes) unless that run is already
        recorded as ``ok``."""
        if not rows or rows[0]["run_id"] in self.done:
            return
        if outcomes:
            RunStore.beside(self.out_csv).save_outcomes(
                rows[0]["run_id"], Outcomes.from_bytes(outcomes)
            )
        append_rows(self.out_csv, rows)
        self.summary.add(rows)
        if rows[0]["status"] == "ok":
            self.done.add(rows[0]["run_id"])
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc="runs", unit="run", disable=not self.progress)
        self._bar.update()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if ROWS_KEY in result:
            outcomes = base64.b64decode(result.get(OUTCOMES_KEY, ""))
            self.record(json.loads(result[ROWS_KEY]), outcomes)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        spec = RunSpec.from_dict(trial.config["run"]["spec"])
        error = trial.get_error() or RuntimeError("the Ray Tune trial failed")
        self.record(failed_rows(spec, _last_line(error)))


class TrialError(RuntimeError):
    """The error of a trial that died outside ``evaluate``, summed up in one line."""


def _last_line(error: BaseException) -> TrialError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return TrialError(lines[-1] if lines else type(error).__name__)


def parse_address(address: str, source: str = "--ray-address") -> tuple[str, int] | None:
    """The host and port of a Ray cluster address, or None for ``auto`` (Ray finds it).

    Args:
        address: ``HOST:PORT`` of the head node's GCS (``[IPv6]:PORT`` for IPv6), or ``auto``.
        source: where the address came from, for the message.

    Raises:
        UserError: a ``ray://`` client address, or anything that is not ``HOST:PORT``.
    """
    if address == "auto":
        return None
    if address.startswith("ray://"):
        raise UserError(
            "ray:// client addresses are not supported: run ppt-bench on a node of the "
            "cluster with --ray-address HEAD_IP:6379"
        )
    match = _ADDRESS.fullmatch(address)
    port = int(match["port"]) if match else 0
    if not match or not 0 < port < 65536:
        raise UserError(
            f"{source} must be HOST:PORT of the Ray head node (as in HEAD_IP:6379) or auto, "
            f"got {address!r}"
        )
    return match["ipv6"] or match["host"], port


def check_reachable(host: str, port: int, source: str = "--ray-address") -> None:
    """Fail now, not after Ray's minutes of retries, when nothing listens at the address.

    Raises:
        UserError: the address does not accept a TCP connection within a few seconds.
    """
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise UserError(
            f"no Ray cluster answers at {source} {host}:{port} ({reason.lower()}): start it "
            "with `ray start --head --port=PORT` or fix the address"
        ) from None


def check_token(address: str, source: str = "--ray-address") -> None:
    """Ask the cluster's GCS once, briefly: ``ray.init`` would retry for minutes when it refuses
    this machine's token or when something else listens at the address.

    Ray has no public call that asks a GCS once with a timeout (``ray.init`` has no timeout
    argument), so this uses the client that ``ray.init`` itself builds, private in Ray.

    Raises:
        UserError: the cluster refuses this process's token (none, or another cluster's), or
            no Ray GCS answers at the address.
    """
    try:
        with _stderr_to_devnull():  # Ray's C++ log lines about it; ours says it all
            InnerGcsClient.standalone(address, None, int(CONNECT_TIMEOUT_S * 1000))
    except AuthenticationError:
        raise UserError(
            f"the Ray cluster at {source} {address} refused this machine's token "
            "(InvalidAuthToken): set RAY_AUTH_MODE=token and put the head node's token in "
            "~/.ray/auth_token (`ray get-auth-token` on the head node prints it)"
        ) from None
    except Exception as err:
        if "timed out" not in str(err).lower():
            return  # anything else: ray.init says what it is
        raise UserError(
            f"no Ray cluster answers at {source} {address} (something else listens there): "
            "pass the head node's GCS port (ray start --head --port=PORT)"
        ) from None


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Silence file descriptor 2, where Ray's C++ code logs, for the duration of a block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_storage(path: Path, source: str) -> None:
    """Check that Tune can keep its experiment in ``path``, creating the folder if needed.

    Raises:
        UserError: ``path`` is not a folder that this process can write to.
    """
    check_output_path(path, source, directory=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = (err.strerror or type(err).__name__).lower()
        raise UserError(
            f"{source} {path} is not a folder Ray Tune can write to ({reason}): pass another "
            "folder with --ray-storage"
        ) from None


def _path_hash(path: Path) -> str:
    return hashlib.sha1(str(path).encode()).hexdigest()[:8]


def _reload_auth_config() -> None:
    """Make this process's Ray read RAY_AUTH_MODE and the token again.

    Ray reads both once per process and keeps them; it has no public call to read them again,
    and without one a second sweep in this process would present the first instance's token.
    So this calls what ``ray.init`` and Ray's own tests call, private in Ray.
    """
    Config.initialize("")  # before the token cache, as Ray's own tests do
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Keep a new local instance on 127.0.0.1.

    A new local instance takes this machine's address (``ray.util.get_node_ip_address``), its
    network address, unless Ray's multi-node support is off; then it is 127.0.0.1. ``ray.init``
    has no public argument for the address (``ray start --node-ip-address`` has, for a
    cluster started by hand), and the documented switch, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``,
    is read once, when Ray is imported: so this process's copy of it, private in Ray, is set
    here, and the Ray processes started meanwhile see the environment variable.
    """
    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with environ(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


@contextlib.contextmanager
def _generated_token() -> Iterator[None]:
    """Token authentication with a token made for this instance only.

    ``RAY_AUTH_TOKEN`` comes before ``RAY_AUTH_TOKEN_PATH`` and ``~/.ray/auth_token``, so a
    token left there by another cluster is neither used nor overwritten. The token lives in the
    environment of this process and of the Ray processes it starts, readable by this user only.
    """
    try:
        with environ(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_urlsafe(32)):
            _reload_auth_config()
            yield
    finally:
        _reload_auth_config()  # with the environment as it was


class RayRunner:
    """Run specs as Ray Tune trials and append their rows to a results CSV.

    Args:
        out_csv: results file; runs already ``ok`` in it are skipped.
        address: an existing cluster (``HEAD_IP:6379`` or ``auto``); default ``RAY_ADDRESS``, or
            a new private instance on loopback with a token of its own. Checked now: a malformed
            address, one where no Ray GCS answers, or a cluster that refuses this machine's
            token raise :class:`UserError`.
        storage_path: where Tune keeps experiment state (default ``~/ray_results``); created
            now, and :class:`UserError` if it cannot be written.
        resources: per-trial resource requests.
        max_concurrent: at most this many trials at once (default: as resources allow).
        num_cpus: CPUs of a new local instance (default: all).
        progress: show a progress bar across runs.
    """

    def __init__(
        self,
        out_csv: str | os.PathLike,
        *,
        address: str | None = None,
        storage_path: str | os.PathLike | None = None,
        resources: TrialResources | None = None,
        max_concurrent: int | None = None,
        num_cpus: int | None = None,
        progress: bool = True,
    ) -> None:
        self.out_csv = Path(out_csv).resolve()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self._address_source = "--ray-address" if address else "RAY_ADDRESS"
        host_port = parse_address(self.address, self._address_source) if self.address else None
        if host_port and not ray.is_initialized():
            check_reachable(*host_port, self._address_source)
            check_token(self.address, self._address_source)
        # A cluster on this machine's loopback: Ray must not swap 127.0.0.1 for another address.
        self._loopback = bool(host_port) and _is_loopback(host_port[0])
        default_storage = Path("~/ray_results").expanduser()
        self.storage_path = Path(storage_path or default_storage).expanduser().resolve()
        check_storage(self.storage_path, "--ray-storage" if storage_path else "Ray Tune's folder")
        self.resources = resources or TrialResources()
        self.max_concurrent = max_concurrent
        self.num_cpus = num_cpus
        self.progress = progress
        self._token = ""  # this sweep's mark in the outcomes folder (``_mark_store``)

    def run(self, specs: Sequence[RunSpec]) -> SweepSummary:
        """Run every spec not yet ``ok`` in the results file as one Tune trial each."""

        todo, skipped = pending(specs, self.out_csv)
        summary = SweepSummary(self.out_csv, total=len(specs), skipped=skipped)
        if not todo:
            return summary
        sweep = specs[0].sweep or "sweep"
        self._token = self._mark_store()
        # The results file is part of the name: another --out is another experiment. The hashes
        # tell experiments apart, the sweep's name (its start) only labels the folder, so that a
        # long name that fits a results file fits here too.
        label = sweep[:_LABEL]
        exp_dir = self.storage_path / f"{label}-{grid_hash(specs)}-{_path_hash(self.out_csv)}"
        # Trials keep the driver's working directory (Tune propagates this variable to them);
        # paths in specs from the grid are absolute anyway.
        with environ(RAY_CHDIR_TO_TRIAL_DIR="0"), self._ray():
            self._check_resources(todo)
            if self._can_restore(exp_dir):
                self._fit(self._restored(exp_dir, summary, len(todo)), exp_dir)
                attempted = finished_run_ids(self.out_csv) | set(summary.failed)
                todo = [s for s in todo if s.run_id not in attempted]
            if todo:
                shutil.rmtree(exp_dir, ignore_errors=True)
                self._fit(self._tuner(todo, exp_dir, summary), exp_dir)
        return summary

    def _mark_store(self) -> str:
        """Leave this sweep's token in the outcomes folder, for trials to see if they share it."""
        token = secrets.token_hex(8)
        folder = store_folder(self.out_csv)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / DRIVER_FILE, lambda f: f.write(token), binary=False)
        return token

    @contextlib.contextmanager
    def _ray(self) -> Iterator[None]:
        """Use Ray as it is if already initialised; else connect or start (and later stop) it."""
        if ray.is_initialized():
            yield
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address:
            local = _loopback_only() if self._loopback else contextlib.nullcontext()
            with local, self._started(self._connect):
                yield
        else:
            with _loopback_only(), _generated_token(), self._started(self._start_private):
                yield

    @contextlib.contextmanager
    def _started(self, init: Callable[[], None]) -> Iterator[None]:
        """Run ``init``, then the block; shut Ray down after both, even half started.

        ``ray.init`` replaces the SIGTERM handler with one that exits at once; the handler from
        before is put back, so that SIGTERM goes on requesting a cancellation.
        """
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            init()
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
            yield
        finally:
            ray.shutdown()
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)

    def _connect(self) -> None:
        try:
            ray.init(address=self.address, log_to_driver=False)
        except (ConnectionError, AuthenticationError) as err:
            raise UserError(
                f"cannot join the Ray cluster at {self._address_source} {self.address}: "
                f"{first_line(err)}"
            ) from None

    def _start_private(self) -> None:
        ray.init(
            address="local",  # never join a cluster that happens to run on this machine
            num_cpus=self.num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
        )  # on 127.0.0.1 (_loopback_only), with a token of its own (_generated_token)

    def _check_resources(self, todo: Sequence[RunSpec]) -> None:
        """Trials asking for more than the cluster has would wait forever: refuse them now."""
        have = ray.cluster_resources()
        for spec in todo:
            for name, amount in self.resources.for_spec(spec.to_dict()).items():
                if have.get(name, 0) < amount:
                    raise UserError(
                        f"the Ray cluster has {have.get(name, 0):g} {name} but a {spec.device} "
                        f"trial needs {amount:g}; start Ray on machines with {name}s or change "
                        "--device"
                    )

    def _can_restore(self, exp_dir: Path) -> bool:
        return tune.Tuner.can_restore(exp_dir) and not (exp_dir / _DONE_MARKER).exists()

    def _trainable(self, skip: frozenset[str]):
        store = str(store_folder(self.out_csv))
        trainable = tune.with_parameters(
            _trial, skip=skip, progress=self.progress, store=store, token=self._token
        )
        return tune.with_resources(trainable, _resources(self.resources))

    def _run_config(self, exp_dir: Path, summary: SweepSummary, total: int) -> tune.RunConfig:
        return tune.RunConfig(
            name=exp_dir.name,
            storage_path=str(exp_dir.parent),
            callbacks=[RecordRows(self.out_csv, summary, total, self.progress)],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            stop=CancelStopper(),
            verbose=0,
        )

    def _tuner(self, todo: Sequence[RunSpec], exp_dir: Path, summary: SweepSummary):
        runs = [{"run_id": s.run_id, "spec": s.to_dict()} for s in todo]
        return tune.Tuner(
            self._trainable(frozenset()),
            param_space={"run": tune.grid_search(runs)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=self.max_concurrent,
                trial_dirname_creator=_trial_dirname,
                trial_name_creator=_trial_dirname,
            ),
            run_config=self._run_config(exp_dir, summary, len(todo)),
        )

    def _restored(self, exp_dir: Path, summary: SweepSummary, total: int):
        skip = frozenset(finished_run_ids(self.out_csv))
        with _quiet_tune():
            tuner = tune.Tuner.restore(
                str(exp_dir), self._trainable(skip), resume_unfinished=True, restart_errored=True
            )
        # The restored run config carries a copy of the old callback: write to this results
        # file and count into this summary.
        run_config = tuner._local_tuner.get_run_config()
        for callback in run_config.callbacks or []:
            if isinstance(callback, RecordRows):
                callback.out_csv, callback.summary = self.out_csv, summary
                callback.total, callback.done = total, set(skip)
        run_config.stop = CancelStopper()  # an experiment saved without one gets one
        return tuner

    def _fit(self, tuner: tune.Tuner, exp_dir: Path) -> None:
        """Run the trials, with Tune's SIGINT handler off: a signal only requests a
        cancellation, which :class:`CancelStopper` turns into stopping every trial.

        Raises:
            Cancelled: a cancellation was requested; the finished runs are already in the
                results file, and the same command runs the others.
        """
        with environ(TUNE_DISABLE_SIGINT_HANDLER="1"), _quiet_tune():
            tuner.fit()  # trial errors are recorded by the callback, not raised
        cancel.check()
        (exp_dir / _DONE_MARKER).touch()  # nothing left to restore


class CancelStopper(Stopper):
    """Stops every trial of the experiment once a cancellation was requested
    (:mod:`ppt_bench.core.cancel`); Tune asks it at each step of its loop."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False  # a trial reports once, when its run is done

    def stop_all(self) -> bool:
        return cancel.requested()


class _TuneInterruptFilter(logging.Filter):
    """Drops Tune's messages about a stop signal (SIGUSR1, which Tune still catches) and about
    trials without results (those not run yet, when an interrupted experiment is restored): the
    CLI says what happened, and Tune's advice to resume with ``Tuner.restore`` does not apply
    (the same command resumes)."""

    DROP = ("Stop signal received", "Experiment has been interrupted", "Failed to fetch metrics")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.DROP)


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    loggers = [logging.getLogger(f"ray.tune.{name}") for name in _TUNE_LOGGERS]
    quiet = _TuneInterruptFilter()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
