"""ppt-bench: benchmarking and ablation harness for token reduction in Vision Transformers.

The library API (:mod:`ppt_bench.api`), which the ``ppt-bench`` commands stand on:

>>> import ppt_bench
>>> results = ppt_bench.sweep(models=["deit_tiny_patch16_224"], methods=["ppt", "tome"])
>>> ppt_bench.write_report("results/sweep.csv", "reports/sweep.md")

The three functions here hand over to :mod:`ppt_bench.api` with the same arguments, importing it
on the first call: it imports torch, timm and pandas, which ``import ppt_bench`` (and so
``ppt-bench --help`` and the other light commands) should not wait for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppt_bench.core.identity import VERSION as __version__

if TYPE_CHECKING:
    import pandas as pd

    from ppt_bench.results.report import Report


def sweep(
    models: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    *,
    config: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
    sweep: Mapping[str, Sequence[Any]] | None = None,
    progress: bool = False,
    **settings: Any,
) -> pd.DataFrame:
    """Run a grid of models x methods x parameters x batch sizes and return its results:
    :func:`ppt_bench.api.sweep`, which describes the arguments."""
    from ppt_bench import api  # imported here: torch, timm and pandas (see above)

    return api.sweep(
        models, methods, config=config, params=params, sweep=sweep, progress=progress, **settings
    )


def read_results(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The rows of one or several results CSVs in one frame, checked:
    :func:`ppt_bench.results.records.read_results`."""
    from ppt_bench import api  # imported here: torch, timm and pandas (see above)

    return api.read_results(paths)


def write_report(
    csvs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    command: str | None = None,
    notes: str | os.PathLike | None = None,
) -> Report:
    """Write the markdown report of results CSVs and its PNG plots:
    :func:`ppt_bench.results.report.write_report`, which describes the arguments."""
    from ppt_bench import api  # imported here: torch, timm and pandas (see above)

    return api.write_report(csvs, out, command=command, notes=notes)


__all__ = ["__version__", "read_results", "sweep", "write_report"]
