"""The method contract (:mod:`ppt_bench.testing`) over every registered method, the plugin
package's method in ``tests/plugins`` included: each property is one test function
parametrised over them."""

from __future__ import annotations

import ppt_bench.testing as contract
from ppt_bench.methods import list_methods
from ppt_bench.testing import *  # noqa: F403

PROPERTIES = [name for name in contract.__all__ if name.startswith("test_")]


def _methods_of(test) -> set[str]:
    """The methods a contract test is parametrised over (its ``name`` axis)."""
    found: set[str] = set()
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        argnames = mark.args[0]
        argnames = (
            [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else argnames
        )
        if "name" in argnames:
            index = list(argnames).index("name")
            found |= {v if len(argnames) == 1 else v[index] for v in mark.args[1]}
    return found


def test_each_property_is_one_test_parametrised_over_the_methods():
    """Eleven properties, each one function whose ``name`` axis is every registered method (the
    plugin's included), or every method that reduces, less the baseline where a property is
    about reducing."""
    assert len(PROPERTIES) == 11, PROPERTIES
    every = set(list_methods())
    assert "distmerge" in every
    for name in PROPERTIES:
        methods = _methods_of(getattr(contract, name))
        assert methods in (every, every - {"baseline"}), (name, every - methods)
