"""The distribution as a user installs it: the built wheel holds every subpackage of the three
source folders (found by setup.py, not listed by hand) and the command runs from it alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"bench": "ppt_bench", "methods": "ppt_bench/methods", "runners": "ppt_bench/runners"}
# A module of a subpackage of a subpackage.
WHERE = "from ppt_bench.methods.patch import rope; print(rope.__file__)"


@pytest.mark.slow
def test_the_wheel_holds_every_subpackage_and_the_command_runs_from_it(tmp_path):
    dist, site = tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # From a copy of the sources, so that no build folder of an earlier build (which keeps files
    # the tree has since lost) goes into the wheel, and none is left in the tree.
    source = tmp_path / "source"
    for folder in PACKAGES:
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, source]
    subprocess.run(build, check=True)
    (wheel,) = dist.glob("ppt_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in PACKAGES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            inside = init.parent.relative_to(ROOT / folder).as_posix()
            path = f"{package}/{inside}/__init__.py" if inside != "." else f"{package}/__init__.py"
            assert path in names, f"{path} is not in the wheel"
    assert "ppt_bench/methods/data/diffrate_schedules.json" in names
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)

    # The installed copy, not the source tree, on a path of its own (dependencies from this
    # environment), and run from a folder with no source in it.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", WHERE],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(site)
    listed = subprocess.run(
        [sys.executable, "-m", "ppt_bench.cli", "list"],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert all(name in listed.stdout for name in ("ppt", "tome", "diffrate", "gtp"))
