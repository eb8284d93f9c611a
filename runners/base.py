"""What both runners share: the summary of a sweep and one run with its failure captured."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppt_bench.records import finished_run_ids
from ppt_bench.spec import RunSpec


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
            from ppt_bench.report import format_params

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


def run_one(spec: RunSpec) -> list[dict[str, Any]]:
    """Evaluate one run; any exception becomes a ``status=failed`` row, never a crash."""
    from ppt_bench.evaluate import evaluate, failed_rows

    try:
        return evaluate(spec)
    except Exception as exc:  # one bad run must not stop a sweep
        return failed_rows(spec, exc)


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
