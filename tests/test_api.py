"""The library API: the example of docs/library-api.md runs as it is, and a sweep from the
library is the sweep ``ppt-bench run`` makes (same runs, same ids, same rows)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ppt_bench
from ppt_bench.cli import main
from ppt_bench.core.errors import UserError
from ppt_bench.results.records import read_results

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
