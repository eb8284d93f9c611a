"""Budgets: parsing, each method's knob, MAC budgets met on real models, speed budgets on planted
models, and ``run --budget --plan``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ppt_bench.cli import main
from ppt_bench.core.errors import UserError
from ppt_bench.measure.throughput import measure_throughput
from ppt_bench.methods import create_method, is_patched, list_methods
from ppt_bench.methods.base import Method
from ppt_bench.models.build import describe_vit
from ppt_bench.sweeps import budget
from ppt_bench.sweeps.budget import Budget, ModelCost, parse_budget, resolve_macs, search_speed

SHARES = (0.85, 0.7, 0.55)
METHODS = [m for m in list_methods() if m != "baseline"]


def test_parse_budget():
    assert parse_budget("gmacs=2.9") == Budget("gmacs", 2.9)
    assert parse_budget(" MACS=0.65") == Budget("macs", 0.65)
    assert parse_budget("speedup=1.4").label == "speedup=1.4"
    assert Budget("macs", 0.5).target_gmacs(4.0) == 2.0
    assert Budget("speedup", 2.0).target_gmacs(4.0) == 2.0
    for bad in ("macs", "flops=2", "macs=1.5", "speedup=0.9", "gmacs=-1", "gmacs=nan", "r=3"):
        with pytest.raises(UserError, match="budget"):
            parse_budget(bad)


@dataclass(frozen=True)
class NoKnob(Method):
    """A third-party method that declares no knob."""

    r: int = 1


def _fake_cost() -> SimpleNamespace:
    """What resolve_macs reads of a cost model before it measures anything."""
    return SimpleNamespace(
        name="deit_tiny_patch16_224", info=describe_vit("deit_tiny_patch16_224"), base_gmacs=1.0
    )


def test_a_method_without_a_knob_is_refused_with_one_line(monkeypatch):
    monkeypatch.setattr(budget, "create_method", lambda name, **p: NoKnob(**p))
    with pytest.raises(UserError, match="declares no budget knob"):
        resolve_macs(_fake_cost(), "noknob", {}, "macs=0.5")


def test_a_knob_given_as_a_parameter_is_refused():
    with pytest.raises(UserError, match="r is the knob a budget sets"):
        resolve_macs(_fake_cost(), "tome", {"r": 4}, "macs=0.5")


# -- MAC budgets on real models (random weights): the Must-show -------------------------------


def test_a_budget_out_of_reach_is_a_reason_not_an_error(one_thread):
    cost = ModelCost("deit_tiny_patch16_224")
    res = resolve_macs(cost, "prune", {"locations": [9]}, "macs=0.5")  # one late location
    assert res.skipped and "cannot reach macs=0.5" in res.reason and res.params is None
    res = resolve_macs(cost, "prune", {"locations": [9]}, "macs=0.97")
    assert not res.skipped and res.gmacs <= 0.97 * cost.base_gmacs
    res = resolve_macs(cost, "diffrate", {}, "macs=0.3")  # below its cheapest schedule
    assert res.skipped and "at schedule=ViT-T-DeiT/0.6 it still costs" in res.reason


def test_the_cost_model_patches_its_copies_again_on_purpose(one_thread):
    """Each probe of a knob patches the cost model's twin and its copy again, explicitly
    (``replace=True``); the unreduced model they are copied from stays unpatched."""
    cost = ModelCost("vit_digits_patch4_32")
    gmacs = [cost.count(create_method(name, r=r)) for name, r in (("prune", 2), ("merge", 8))]
    tokens = [cost.tokens(create_method(name, r=r)) for name, r in (("prune", 2), ("merge", 8))]
    assert gmacs[1] < gmacs[0] < cost.base_gmacs
    assert tokens[0][-1] - tokens[1][-1] == 3 * (8 - 2)  # three locations
    assert cost.twin.reduction_plan.method == create_method("merge", r=8)
    assert not is_patched(cost.model)


# -- speed budgets ------------------------------------------------------------------------------


class Sleeper(nn.Module):
    """A model whose forward takes ``seconds``: its speed is known."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x.mean(dim=(1, 2, 3))


def test_a_speed_budget_resolves_to_the_planted_knob_value():
    """A planted method whose forward at ``r`` sleeps ``base / (1 + 0.25 r)``: a speedup of
    ``1 + 0.25 r`` (r=2: 1.5x, r=3: 1.75x), timed in pairs with the unreduced model as any
    speed budget is. The least r that reaches 1.6x is 3, from any starting point. The sleeps
    are long enough (30 ms) that a loaded machine's scheduling delay does not blur the steps."""
    base = 0.03
    baseline = Sleeper(base)

    def speedup(r: int):
        model = Sleeper(base / (1 + 0.25 * r))
        speed = measure_throughput(
            model, (3, 4, 4), 2, warmup=1, iters=2, rounds=6, baseline=baseline
        )
        return speed.speedup

    values = list(range(9))
    for start in (0, 3, 8):
        index, seen = search_speed(values, start, speedup, 1.6)
        assert values[index] == 3, (start, {values[i]: e.value for i, e in seen.items()})
        assert seen[index].low <= seen[index].value <= seen[index].high
    index, _ = search_speed(values[:2], 1, speedup, 1.6)  # r <= 1 reaches 1.25x at most
    assert index is None


# -- the command line ---------------------------------------------------------------------------


def test_run_budget_plan_prints_the_table_without_data_or_timing(monkeypatch, capsys, tmp_path):
    import ppt_bench.data.loader as data
    import ppt_bench.measure.throughput as throughput

    def forbidden(*args, **kwargs):
        raise AssertionError("--plan built a data loader or timed a model")

    for module, fn in ((data, "build_loader"), (throughput, "measure_throughput")):
        if hasattr(module, fn):
            monkeypatch.setattr(module, fn, forbidden)
    code = main(
        [
            "run",
            "--model",
            "deit_tiny_patch16_224",
            "--method",
            "prune",
            "--method",
            "diffrate",
            "--budget",
            "macs=0.7",
            "--budget",
            "speedup=1.5",
            "--plan",
            "--out",
            str(tmp_path / "r.csv"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| model" in out and "r=" in out and "schedule=ViT-T-DeiT/" in out
    assert "macs=0.7" in out and "speedup=1.5" in out
    assert not (tmp_path / "r.csv").exists()


def test_plan_without_budget_is_a_user_error(capsys):
    code = main(["run", "--model", "deit_tiny_patch16_224", "--method", "prune", "--plan"])
    assert code == 2 and "add --budget" in capsys.readouterr().err


def test_the_uncounted_fft_term_is_counted_on_a_rope_model(one_thread):
    """dct's FFTs on an Eva (whose ``_pos_embed`` also returns its rope table)."""
    import timm

    from ppt_bench.measure.macs import uncounted_macs

    model = create_method("dct", r=8).apply(timm.create_model("eva02_tiny_patch14_224").eval())
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        model(x)
    tokens = (257, *model.reduction_info.tokens)
    assert uncounted_macs(model, x) == model.reduction_plan.method.uncounted_macs(tokens, 1, 192)
    assert uncounted_macs(model, x) > 0


@pytest.mark.slow
def test_run_at_budgets_records_budget_columns_and_skipped_runs_once(tmp_path, capsys):
    from ppt_bench.results.records import read_results

    out = tmp_path / "r.csv"
    args = ["run", "--model", "deit_tiny_patch16_224", "--method", "prune", "--metrics", "macs"]
    args += ["--budget", "macs=0.7", "--budget", "macs=0.3", "--workers", "0", "--out", str(out)]
    args += ["--report", str(tmp_path / "r.md")]
    assert main(args) == 0
    assert "1 runs out of their budget's reach: recorded as skipped" in capsys.readouterr().out
    assert main(args) == 0  # again: the skipped run is not recorded twice
    df = read_results(out)
    skipped = df[df["status"] == "skipped"]
    assert len(skipped) == 1 and skipped["budget"].iloc[0] == "macs=0.3"
    assert "prune cannot reach macs=0.3" in skipped["error"].iloc[0]
    ok = df[(df["status"] == "ok") & (df["metric"] == "gmacs")].set_index("method")
    prune = ok.loc["prune"]
    assert prune["budget"] == "macs=0.7" and '"r": ' in prune["params"]
    assert prune["budget_gmacs"] == pytest.approx(0.7 * ok.loc["baseline", "value"])
    assert prune["value"] <= prune["budget_gmacs"]
    assert prune["budget_share"] == pytest.approx(prune["value"] / ok.loc["baseline", "value"])
    report = (tmp_path / "r.md").read_text()
    assert "### At macs=0.7" in report and "## Skipped at their budget" in report
