"""``LocalRunner``: the runs of a sweep one after the other in this process; no Ray needed.

The runs share one :class:`~ppt_bench.measure.outcomes.RunStore`: the unreduced model's outputs on
the data are computed once (by the baseline's own run when it comes first) and read by the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ppt_bench.core import cancel
from ppt_bench.measure.outcomes import RunStore
from ppt_bench.results.records import append_rows
from ppt_bench.results.spec import RunSpec
from ppt_bench.runners.base import SweepSummary, pending, run_one


class LocalRunner:
    """Run specs sequentially in-process, appending each run's rows as soon as it finishes.

    Args:
        out_csv: results file; runs already ``ok`` in it are skipped.
        progress: show a progress bar across runs.
    """

    def __init__(self, out_csv: str | os.PathLike, *, progress: bool = True) -> None:
        self.out_csv = Path(out_csv)
        self.progress = progress

    def run(self, specs: Sequence[RunSpec]) -> SweepSummary:
        """Run every spec not yet ``ok`` in the results file; a failed run is recorded.

        Raises:
            Cancelled: a cancellation was requested (checked before each run, and inside each
                run between batches and timed rounds); the runs finished before are recorded.
        """
        todo, skipped = pending(specs, self.out_csv)
        summary = SweepSummary(self.out_csv, total=len(specs), skipped=skipped)
        store = RunStore.beside(self.out_csv)
        with tqdm(todo, desc="runs", unit="run", disable=not self.progress or not todo) as bar:
            for spec in bar:
                cancel.check()
                run = f"{spec.model} {spec.method} bs={spec.batch_size}"
                bar.set_postfix_str(run, refresh=False)
                rows = run_one(spec, self.progress, store)
                append_rows(self.out_csv, rows)
                summary.add(rows)
        return summary
