"""What both runners share: the summary of a sweep and one run with its failure captured."""

from __future__ import annotations

from collections.abc import Sequence
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
    """

    out_csv: Path
    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Count one finished run from its rows."""
        if rows and rows[0]["status"] == "ok":
            self.ok += 1
        elif rows:
            self.failed.append(str(rows[0]["run_id"]))


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
