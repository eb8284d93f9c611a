"""The GPU pass's CPU form, as CI runs it: the CUDA steps skip with a line each, the CPU sweep
runs every method at one budget with the cost breakdown, and its folder holds what it wrote."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch

from ppt_bench.commands import gpu_pass
from ppt_bench.methods import list_methods


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form runs where there is no CUDA")
def test_the_gpu_pass_runs_its_cpu_form(tmp_path):
    out = tmp_path / "pass"
    proc = subprocess.run(
        [sys.executable, "-m", "ppt_bench.commands.gpu_pass", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for step in ("pytest-gpu", "attention-bench", "compiled", "batch-8-64", "compiled-rest"):
        assert f"{step}: skipped, no CUDA device on this machine" in lines
    assert any(line.startswith("cpu-eager: ok in ") for line in lines)
    df = pd.read_csv(out / "cpu-cpu-eager.csv")
    ok = df[df["status"] == "ok"]
    assert set(ok["method"]) | set(df.loc[df["status"] == "skipped", "method"]) == set(
        list_methods()
    )
    assert {"speedup", "gmacs", "cost_ops", "part_mlp_ms"} <= set(ok["metric"])
    report = (out / "cpu.md").read_text()
    assert "#### Where the time goes" in report
    assert (out / "cpu-breakdown.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "| cpu-eager | ok |" in summary
    assert (out / "logs" / "cpu-eager.log").read_text().startswith(sys.executable)
    assert list((out / "cpu-cpu-eager.outcomes" / "traces").glob("*.json.gz"))


def test_the_cuda_form_runs_in_priority_order(tmp_path):
    names = [s.name for s in gpu_pass.steps(tmp_path, "nvidia-h100", cuda=True)]
    assert names == [
        "pytest-gpu",
        "attention-bench",
        "eager-cudagraph",
        "compiled",
        "batch-8-64",
        "compiled-rest",
    ]
    eager = gpu_pass.steps(tmp_path, "nvidia-h100", cuda=True)[2].argv
    assert (
        "cudagraph" in eager
        and "bf16" in eager
        and str(tmp_path / "nvidia-h100-eager-cudagraph.csv") in eager
    )
