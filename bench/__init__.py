"""ppt-bench: benchmarking and ablation harness for token reduction in Vision Transformers.

The library API (:mod:`ppt_bench.api`), which the ``ppt-bench`` commands stand on:

>>> import ppt_bench
>>> results = ppt_bench.sweep(models=["deit_tiny_patch16_224"], methods=["ppt", "tome"])
>>> ppt_bench.write_report(ppt_bench.read_results("results/sweep.csv"), "reports/sweep.md")
"""

from __future__ import annotations

from typing import Any

from ppt_bench.core.identity import VERSION as __version__

_API = ("sweep", "read_results", "write_report")


def __getattr__(name: str) -> Any:
    """The library API, imported on first use: it imports torch and timm, which ``ppt-bench
    --help`` and the other light commands should not wait for."""
    if name in _API:
        from ppt_bench import api  # imported here: it imports torch and timm (see above)

        return getattr(api, name)
    raise AttributeError(f"module 'ppt_bench' has no attribute {name!r}")


__all__ = ["__version__", *_API]
