"""Packages found under each source folder: ``bench/`` is ``ppt_bench``, ``methods/`` is
``ppt_bench.methods`` and ``runners/`` is ``ppt_bench.runners``, each with its subpackages."""

from setuptools import find_packages, setup

ROOTS = {"ppt_bench": "bench", "ppt_bench.methods": "methods", "ppt_bench.runners": "runners"}

setup(
    package_dir=ROOTS,
    packages=[
        f"{name}.{sub}" if sub else name
        for name, folder in ROOTS.items()
        for sub in ["", *find_packages(folder)]
    ],
)
