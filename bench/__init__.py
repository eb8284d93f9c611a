"""ppt-bench: benchmarking and ablation harness for token reduction in Vision Transformers.

The library API (:mod:`ppt_bench.api`), which the ``ppt-bench`` commands stand on:

>>> import ppt_bench
>>> results = ppt_bench.sweep(models=["deit_tiny_patch16_224"], methods=["ppt", "tome"])
>>> ppt_bench.write_report("results/sweep.csv", "reports/sweep.md")

The functions here hand over to :mod:`ppt_bench.api` with their arguments, importing it
on the first call: it imports torch, timm and pandas, which ``import ppt_bench`` (and so
``ppt-bench --help`` and the other light commands) should not wait for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ppt_bench.core.identity import VERSION as __version__

if TYPE_CHECKING:
    import pandas as pd

    from ppt_bench.results.report import Report


def sweep(*args: Any, **kwargs: Any) -> pd.DataFrame:
    """Run a grid of models x methods x parameters x batch sizes and return its results:
    :func:`ppt_bench.api.sweep`, whose arguments it takes."""
    from ppt_bench import api  # imported here: torch, timm and pandas (see above)

    return api.sweep(*args, **kwargs)


def read_results(*args: Any, **kwargs: Any) -> pd.DataFrame:
    """The rows of one or several results CSVs in one frame, checked:
    :func:`ppt_bench.results.records.read_results`, whose arguments it takes."""
    from ppt_bench import api  # imported here: torch, timm and pandas (see above)

    return api.read_results(*args, **kwargs)


def write_report(*args: Any, **kwargs: Any) -> Report:
    """Write the markdown report of results CSVs and its PNG plots:
    :func:`ppt_bench.results.report.write_report`, whose arguments it takes."""
    from ppt_bench import api  # imported here: torch, timm and pandas (see above)

    return api.write_report(*args, **kwargs)


def cost_breakdown(*args: Any, **kwargs: Any) -> pd.DataFrame:
    """Where one forward of a (patched) model spends its time, one row per part:
    :func:`ppt_bench.api.cost_breakdown`, whose arguments it takes."""
    from ppt_bench import api  # imported here: torch, timm and pandas (see above)

    return api.cost_breakdown(*args, **kwargs)


__all__ = ["__version__", "cost_breakdown", "read_results", "sweep", "write_report"]
