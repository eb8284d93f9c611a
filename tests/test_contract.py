"""The method contract (:mod:`ppt_bench.testing`) over every registered method, the toy plugin
method of ``tests/plugins`` included: each property is one test parametrised over them."""

from __future__ import annotations

from ppt_bench.testing import *  # noqa: F403
