"""Runners map ``evaluate(spec) -> records`` over a sweep: in-process or on Ray Tune.

``LocalRunner`` imports nothing beyond ppt-bench itself; ``RayRunner`` needs ``ray[tune]``
(``pip install 'ppt-bench[ray]'``) and is imported from :mod:`ppt_bench.runners.ray_tune`.
"""

from __future__ import annotations

from ppt_bench.runners.base import SweepSummary
from ppt_bench.runners.local import LocalRunner

__all__ = ["LocalRunner", "SweepSummary"]
