"""The library API: the example of docs/library-api.md runs as it is, and a sweep from the
library is the sweep ``ppt-bench run`` makes (same runs, same ids, same rows)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

import ppt_bench
from ppt_bench import api
from ppt_bench.cli import main
from ppt_bench.core.errors import UserError
from ppt_bench.methods import create_method
from ppt_bench.methods.merge import Merge
from ppt_bench.results.records import read_results
from ppt_bench.runners.base import SweepSummary

DIGITS = "vit_digits_patch4_32"
PAGE = Path(__file__).resolve().parents[1] / "docs" / "library-api.md"


def library_example() -> str:
    return re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)


def test_the_library_example_runs(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    exec(compile(library_example(), "docs/library-api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "5 runs finished" in out  # the baseline, ppt and tome at r = 2 and 4
    assert (tmp_path / "reports" / "notebook.md").is_file()
    df = read_results(tmp_path / "results" / "notebook.csv")
    gmacs = df[df["metric"] == "gmacs"]
    tome = gmacs[gmacs["method"] == "tome"].set_index("r")["value"]
    baseline = gmacs.loc[gmacs["method"] == "baseline", "value"].item()
    assert tome[4] < tome[2] < baseline


def test_a_library_sweep_is_the_command_line_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = dict(data="synthetic", batch_sizes=[2], metrics=["tokens"], n_images=2, workers=0)
    lib = ppt_bench.sweep(["vit_digits_patch4_32"], ["merge"], params={"r": 3}, **settings)
    args = ["run", "--model", "vit_digits_patch4_32", "--method", "merge", "--param", "r=3"]
    args += ["--data", "synthetic", "--batch-size", "2", "--metrics", "tokens", "--n-images", "2"]
    args += ["--workers", "0"]
    assert main([*args, "--out", "cli.csv", "--no-report", "--quiet"]) == 0
    cli = read_results(tmp_path / "cli.csv")
    assert set(lib["run_id"]) == set(cli["run_id"]) and len(set(cli["run_id"])) == 2
    columns = ["run_id", "metric", "value"]
    assert lib[columns].sort_values(columns[:2]).values.tolist() == (
        cli[columns].sort_values(columns[:2]).values.tolist()
    )
    again = ppt_bench.sweep(["vit_digits_patch4_32"], ["merge"], params={"r": 3}, **settings)
    assert again.attrs["summary"].skipped == 2 and again.attrs["summary"].ok == 0


def test_an_unknown_setting_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"unknown settings \['batch_size'\]; valid settings: "):
        ppt_bench.sweep(["vit_digits_patch4_32"], ["merge"], batch_size=4)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("name", ["sweep", "read_results", "write_report"])
def test_the_package_functions_hand_over_to_the_api(name, monkeypatch):
    """``ppt_bench.sweep`` and the others call ``ppt_bench.api``'s (imported on first use) with
    the arguments they were given."""
    from ppt_bench import api

    monkeypatch.setattr(api, name, lambda *args, **kwargs: (args, kwargs))
    assert getattr(ppt_bench, name)(1, key=2) == ((1,), {"key": 2})


def test_a_library_sweep_takes_one_item_for_a_list_a_method_object_and_paths(tmp_path):
    """A model name alone is one model (not its letters), one swept value is a list of one, a
    method object runs with the parameters it holds (the same run as its name with those
    parameters), and every path may be a ``Path``."""
    images = tmp_path / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 10, 10)).save(images / label / "0.png")
    out = tmp_path / "results" / "lib.csv"
    settings = dict(data=images, out=out, cache=False, baseline=False, batch_sizes=[2])
    settings.update(metrics="tokens", n_images=2, workers=0)
    merge = create_method("merge", locations=[2, 1], prop_attn=False)
    results = ppt_bench.sweep(DIGITS, [merge, "tome"], sweep={"r": 2}, **settings)
    assert results.attrs["summary"].ok == 2 and set(results["model"]) == {DIGITS}
    params = dict(results.groupby("method")["params"].first())
    assert params == {
        "merge": '{"locations": [1, 2], "prop_attn": false, "r": 2}',
        "tome": '{"r": 2}',
    }
    again = ppt_bench.sweep(
        [DIGITS], "merge", params={"locations": [1, 2], "prop_attn": False, "r": 2}, **settings
    )
    assert again.attrs["summary"].skipped == 1 and set(again["method"]) == {"merge"}
    assert read_results(out)["data_fingerprint"].nunique() == 1


# Each case: arguments that a Python user may pass, and the arguments of the same sweep in the
# documented form (lists, strings).
SAME_SWEEP = {
    "a model name alone": (dict(models=DIGITS), dict(models=[DIGITS])),
    "a method name alone": (dict(methods="merge"), dict(methods=["merge"])),
    "one swept value": (dict(sweep={"r": 2}), dict(sweep={"r": [2]})),
    "a method object": (
        dict(methods=[create_method("merge", r=2, prop_attn=False)]),
        dict(methods=["merge"], params={"r": 2, "prop_attn": False}),
    ),
    "paths": (
        dict(data=Path("images"), out=Path("r.csv"), cache_dir=Path("cache")),
        dict(data="images", out="r.csv", cache_dir="cache"),
    ),
}


@pytest.mark.parametrize("case", SAME_SWEEP, ids=list(SAME_SWEEP))
def test_what_a_python_user_passes_plans_the_documented_sweep(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "images" / label / "0.png")
    planned = []

    def plan(self, **kwargs):
        planned.append(([s.run_id for s in self.specs], self.config.out_path))
        return SweepSummary(self.config.out_path)

    monkeypatch.setattr(api.Sweep, "run", plan)
    given, documented = SAME_SWEEP[case]
    for arguments in (given, documented):
        ppt_bench.sweep(**{"models": [DIGITS], "methods": ["merge"], **arguments})
    assert planned[0] == planned[1] and len(planned[0][0]) == 2  # the baseline and merge


class Unregistered(Merge):
    """A method class that no registry names."""


WRONG_TYPES = {
    "a number for models": (
        dict(models=123),
        "models takes a model name or a list of them, got 123 (int)",
    ),
    "a number among the methods": (
        dict(methods=["ppt", 5]),
        "methods takes a method name, a Method object or a list of them, got 5 (int)",
    ),
    "an unregistered method object": (
        dict(methods=[Unregistered()]),
        "is of class Unregistered, which is not registered: register it with",
    ),
    "pairs for params": (
        dict(params=[("r", 3)]),
        "params takes a dict of parameter names to values, such as {'r': 8}, got [('r', 3)]",
    ),
    "a name for sweep": (dict(sweep="r"), "sweep takes a dict of parameter names to values"),
}


@pytest.mark.parametrize("case", WRONG_TYPES, ids=list(WRONG_TYPES))
def test_a_library_argument_of_a_wrong_type_is_named_with_the_types_it_takes(
    case, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    arguments, message = WRONG_TYPES[case]
    arguments = {"models": DIGITS, "methods": "merge", **arguments}
    with pytest.raises(TypeError) as err:
        ppt_bench.sweep(**arguments)
    assert isinstance(err.value, UserError) and message in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_create_method_names_the_argument_of_a_wrong_type():
    with pytest.raises(
        TypeError, match=r"^a method name must be a str such as .*, got 123 \(int\)$"
    ):
        create_method(123)
    with pytest.raises(UserError, match=r"unknown method 'ppx'"):
        create_method("ppx")
