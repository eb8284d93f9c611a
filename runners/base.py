"""What every runner shares: the :class:`Runner` protocol, the summary of a sweep and one run
with its failure captured.

A runner only schedules: it maps :func:`~ppt_bench.engine.evaluate.evaluate` over the runs not yet
in the results file and appends each run's rows as it finishes, its per-image outcomes first
(:class:`~ppt_bench.measure.outcomes.RunStore`, beside the results file). Between runs it checks
the cancellation flag (:func:`ppt_bench.core.cancel.check`), so that a cancelled sweep stops
with every finished run recorded. A new runner is a class with the constructor and ``run`` of
:class:`Runner`, listed in :data:`~ppt_bench.runners.RUNNERS`; the settings only it understands
are its ``options`` (each becomes a ``--flag`` and a config key).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ppt_bench.core import cancel
from ppt_bench.measure.outcomes import RunStore
from ppt_bench.results.records import failed_rows, finished_run_ids, format_params
from ppt_bench.results.spec import RunSpec


class Runner(Protocol):
    """Runs a sweep's specs and appends their rows to a results CSV; built as
    ``Runner(out_csv, progress=..., **options)`` with the options of its :data:`RUNNERS` entry."""

    def run(self, specs: Sequence[RunSpec]) -> SweepSummary:
        """Run every spec not yet ``ok`` in the results file; record failures as rows.

        Raises:
            Cancelled: a cancellation was requested; the runs finished before are recorded.
        """
        ...


@dataclass
class SweepSummary:
    """How a sweep went.

    Args:
        out_csv: the results file.
        total: runs in the grid.
        skipped: runs already ``ok`` in ``out_csv`` before this sweep, not run again.
        ok: runs that finished in this sweep.
        failed: run ids that failed in this sweep (each recorded as a ``status=failed`` row).
        errors: one line per failed run: the model, method, parameters, batch size and error.
    """

    out_csv: Path
    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Count one finished run from its rows."""
        if rows and rows[0]["status"] == "ok":
            self.ok += 1
        elif rows:
            row = rows[0]
            self.failed.append(str(row["run_id"]))
            params = format_params(row["params"])
            run = " ".join(filter(None, (row["model"], row["method"], params)))
            self.errors.append(f"{run} (batch size {row['batch_size']}): {row['error']}")


def pending(specs: Sequence[RunSpec], out_csv: Path) -> tuple[list[RunSpec], int]:
    """The runs not yet ``ok`` in ``out_csv`` (failed ones run again), and how many were done."""
    done = finished_run_ids(out_csv)
    todo = [s for s in specs if s.run_id not in done]
    return todo, len(specs) - len(todo)


def run_one(
    spec: RunSpec, progress: bool = True, store: RunStore | None = None
) -> list[dict[str, Any]]:
    """Evaluate one run; any exception becomes a ``status=failed`` row, never a crash.

    A run that fails after a cancellation was requested raises
    :class:`~ppt_bench.core.cancel.Cancelled` instead: the cancellation is why (a DataLoader's
    workers stopped by the same Ctrl-C), not the run.

    Args:
        spec: the run.
        progress: show progress bars.
        store: the sweep's per-image outcomes and shared unreduced-model outputs.
    """
    # Imported here: evaluation imports torch and timm, which a Ray driver that only schedules
    # trials need not load (its trials import it).
    from ppt_bench.engine.evaluate import evaluate

    try:
        return evaluate(spec, progress=progress, store=store)
    except Exception as exc:  # one bad run must not stop a sweep
        cancel.check()
        return failed_rows(spec, exc)


def grid_hash(specs: Iterable[RunSpec]) -> str:
    """A short hash of the runs in a grid (order-free), to name its Ray Tune experiment."""
    blob = ",".join(sorted(s.run_id for s in specs))
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
