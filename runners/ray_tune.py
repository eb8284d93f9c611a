"""``RayRunner``: one Ray Tune trial per run, on a local Ray instance or an existing cluster.

Each trial calls the same :func:`~ppt_bench.runners.base.run_one` as the local runner and
reports its rows as one JSON string; a callback on the driver appends them to the results CSV as
each trial finishes, so an interrupted sweep keeps every finished run. Trials that Tune itself
reports as errored (a worker killed for memory, a lost node) become ``status=failed`` rows.

Resuming: the Tune experiment is named after the sweep and a hash of its grid, so the same
command finds it again. An interrupted experiment is restored (``Tuner.restore``); runs already
``ok`` in the CSV are skipped either way, and anything left over runs in a fresh experiment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from tqdm.auto import tqdm

from ppt_bench import metrics
from ppt_bench.errors import UserError
from ppt_bench.records import append_rows, finished_run_ids
from ppt_bench.runners.base import SweepSummary, environ, pending, run_one
from ppt_bench.spec import RunSpec

ROWS_KEY = "ppt_bench_rows"
_DONE_MARKER = ".ppt-bench-complete"


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


def _trial(
    config: dict[str, Any], skip: frozenset[str] = frozenset(), progress: bool = True
) -> None:
    """The Tune trainable: evaluate one spec and report its rows."""
    spec = RunSpec.from_dict(config["run"]["spec"])
    rows = [] if spec.run_id in skip else run_one(spec, progress)
    tune.report({ROWS_KEY: json.dumps(rows, default=str)})


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

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Append one run's rows unless that run is already recorded as ``ok``."""
        if not rows or rows[0]["run_id"] in self.done:
            return
        append_rows(self.out_csv, rows)
        self.summary.add(rows)
        if rows[0]["status"] == "ok":
            self.done.add(rows[0]["run_id"])
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc="runs", unit="run", disable=not self.progress)
        self._bar.update()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if ROWS_KEY in result:
            self.record(json.loads(result[ROWS_KEY]))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        from ppt_bench.evaluate import failed_rows

        spec = RunSpec.from_dict(trial.config["run"]["spec"])
        error = trial.get_error() or RuntimeError("the Ray Tune trial failed")
        self.record(failed_rows(spec, _last_line(error)))


class TrialError(RuntimeError):
    """The error of a trial that died outside ``evaluate``, summed up in one line."""


def _last_line(error: BaseException) -> TrialError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return TrialError(lines[-1] if lines else type(error).__name__)


class RayRunner:
    """Run specs as Ray Tune trials and append their rows to a results CSV.

    Args:
        out_csv: results file; runs already ``ok`` in it are skipped.
        address: an existing cluster (``HEAD_IP:6379`` or ``auto``); default ``RAY_ADDRESS``, or
            a new local instance bound to loopback.
        storage_path: where Tune keeps experiment state (default ``~/ray_results``).
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
        if self.address and self.address.startswith("ray://"):
            raise UserError(
                "ray:// client addresses are not supported: run ppt-bench on a node of the "
                "cluster with --ray-address HEAD_IP:6379"
            )
        default_storage = Path("~/ray_results").expanduser()
        self.storage_path = Path(storage_path or default_storage).expanduser().resolve()
        self.resources = resources or TrialResources()
        self.max_concurrent = max_concurrent
        self.num_cpus = num_cpus
        self.progress = progress

    def run(self, specs: Sequence[RunSpec]) -> SweepSummary:
        """Run every spec not yet ``ok`` in the results file as one Tune trial each."""
        from ppt_bench.grid import grid_hash

        todo, skipped = pending(specs, self.out_csv)
        summary = SweepSummary(self.out_csv, total=len(specs), skipped=skipped)
        if not todo:
            return summary
        sweep = specs[0].sweep or "sweep"
        exp_dir = self.storage_path / f"{sweep}-{grid_hash(specs)}"
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

    @contextlib.contextmanager
    def _ray(self) -> Iterator[None]:
        """Use Ray as it is if already initialised; else connect or start (and later stop) it."""
        if ray.is_initialized():
            yield
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
        else:
            ray.init(
                address="local",
                num_cpus=self.num_cpus or os.cpu_count(),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
            )
        try:
            yield
        finally:
            ray.shutdown()

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
        trainable = tune.with_parameters(_trial, skip=skip, progress=self.progress)
        return tune.with_resources(trainable, _resources(self.resources))

    def _run_config(self, exp_dir: Path, summary: SweepSummary, total: int) -> tune.RunConfig:
        return tune.RunConfig(
            name=exp_dir.name,
            storage_path=str(exp_dir.parent),
            callbacks=[RecordRows(self.out_csv, summary, total, self.progress)],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
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
        tuner = tune.Tuner.restore(
            str(exp_dir), self._trainable(skip), resume_unfinished=True, restart_errored=True
        )
        # The restored run config carries a copy of the old callback; count into this summary.
        for callback in tuner._local_tuner.get_run_config().callbacks or []:
            if isinstance(callback, RecordRows):
                callback.summary, callback.total, callback.done = summary, total, set(skip)
        return tuner

    def _fit(self, tuner: tune.Tuner, exp_dir: Path) -> None:
        results = tuner.fit()  # trial errors are recorded by the callback, not raised
        if results.num_terminated + results.num_errors == len(results):
            (exp_dir / _DONE_MARKER).touch()  # nothing left to restore
