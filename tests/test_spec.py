"""RunSpec validation and its stable run id."""

from __future__ import annotations

import pytest

from ppt_bench.core.defaults import COMPILE_MODES
from ppt_bench.core.errors import MethodError, UserError
from ppt_bench.results.spec import RunSpec

TINY = "deit_tiny_patch16_224"


def test_compile_flag_and_modes_normalise():
    assert RunSpec(model=TINY).compile == "none"
    assert RunSpec(model=TINY, compile=True).compile == "default"
    for mode in COMPILE_MODES[:-1]:
        assert RunSpec(model=TINY, compile=mode).compile == mode
    assert RunSpec(model=TINY, compile=False).run_id == RunSpec(model=TINY, compile="none").run_id


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"compile": "fastest"}, "compile must be one of"),
        ({"compile": "cudagraph"}, "use it with --device cuda"),
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"device": "tpu"}, "device must be cpu, cuda or cuda:N"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"metrics": ("speed",)}, "unknown metrics"),
        ({"model": ""}, "needs a model name"),
        ({"workers": -1}, "workers must be an integer >= 0"),
        ({"metrics": ("memory",)}, "drop memory from --metrics or use --device cuda"),
        ({"metrics": ("macs", "memory")}, "drop memory from --metrics or use --device cuda"),
    ],
)
def test_invalid_specs_say_what_to_do(changes, match):
    with pytest.raises(UserError, match=match):
        RunSpec(**{"model": TINY, **changes})


def test_method_parameters_are_checked_on_construction():
    with pytest.raises(MethodError, match="r must be an integer"):
        RunSpec(model=TINY, method="ppt", params={"r": -2})


def test_run_id_is_stable_and_ignores_scheduling():
    a = RunSpec(model=TINY, method="ppt", params={"r": 8}, sweep="a", workers=1)
    b = RunSpec(model=TINY, method="ppt", params={"r": 8}, sweep="b", workers=8)
    assert a.run_id == b.run_id and len(a.run_id) == 12
    assert a.run_id != a.replace(batch_size=2).run_id
