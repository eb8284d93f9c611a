"""The ``cost`` breakdown: the parts' ranges cover the forward, name what they should, exist only
while profiling, and reach the results, the report and the library view."""

from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch.profiler import ProfilerActivity, profile

import ppt_bench
from ppt_bench.measure import cost, metrics
from ppt_bench.methods import create_method, get_method_class, list_methods, parts
from ppt_bench.results import breakdown

MODELS = {"test_vit": 160, "deit_small_patch16_224": 224}


def reducing(name: str, depth: int) -> dict:
    """The method's reducing example, its locations moved into a 6-block model's blocks."""
    cls = get_method_class(name)
    params = dict(cls.examples.reducing or {})
    if depth < 12:
        if "locations" in {f.name for f in dataclasses.fields(cls)}:
            params["locations"] = [1, 3]
        if name == "diffrate":
            params = {"merge_kept": [90, 80, 70, 60, 50, 40]}
    return params


@pytest.fixture(scope="module")
def profiled() -> dict[tuple[str, str], tuple[torch.nn.Module, list[cost.Forward]]]:
    """Every registered method on each model, five labelled forwards at batch 1 each."""
    out = {}
    for model_name, px in MODELS.items():
        torch.manual_seed(0)
        base = timm.create_model(model_name, pretrained=False).eval()
        x = torch.randn(1, 3, px, px)
        for name in list_methods():
            model = timm.create_model(model_name, pretrained=False).eval()
            model.load_state_dict(base.state_dict())
            model = create_method(name, **reducing(name, len(model.blocks))).apply(model)
            with torch.inference_mode():
                model(x)  # warm-up
            out[model_name, name] = model, cost.profile_forwards(model, x, 5)
    return out


CASES = [(m, n) for m in MODELS for n in list_methods()]


@pytest.mark.parametrize(("model_name", "name"), CASES)
def test_parts_cover_the_forward(profiled, model_name, name):
    """Each part is its ranges' own measured time; together they make up the forward's wall
    time within 10% (the median over three forwards)."""
    _, forwards = profiled[model_name, name]
    covered = np.median([sum(f.parts.values()) / f.wall_us for f in forwards])
    assert 0.9 <= covered <= 1.0 + 1e-6, covered
    known = {*parts.MODEL_PARTS, "method"}
    known |= {f"attention.{p}" for p in parts.ATTENTION} | {f"method.{s}" for s in parts.STEPS}
    assert set(forwards[0].parts) <= known


@pytest.mark.parametrize(("model_name", "name"), CASES)
def test_method_steps_only_where_a_method_reduces(profiled, model_name, name):
    model, forwards = profiled[model_name, name]
    steps = sum(ms for p, ms in forwards[0].parts.items() if p.startswith("method"))
    if name == "baseline":
        assert steps == 0
    else:
        assert model.reduction_info.tokens[-1] < model.reduction_info.tokens[0]
        assert steps > 0
    for part in ("patch_embed", "mlp", "norm", "residual", "head"):
        assert forwards[0].parts[part] > 0


@pytest.mark.parametrize(("model_name", "name"), CASES)
def test_operator_count_is_the_same_on_every_forward(profiled, model_name, name):
    model, forwards = profiled[model_name, name]
    assert len({f.ops for f in forwards}) == 1
    assert forwards[0].ops > 0
    assert len(forwards[0].kernels) == len(model.blocks)  # a kernel for every block


@pytest.mark.parametrize("model_name", list(MODELS))
def test_the_attention_kernel_is_the_one_that_ran(model_name):
    """A fused block runs the CPU's flash SDPA kernel, an explicit one softmax attention."""
    px = MODELS[model_name]
    x = torch.randn(1, 3, px, px)
    found = {}
    for impl in ("fast", "explicit"):
        model = timm.create_model(model_name, pretrained=False).eval()
        model = create_method("tome", r=0).apply(model, attn_impl=impl)
        found[impl] = cost.profile_forwards(model, x)[0].kernels
    assert set(found["fast"].values()) == {"sdpa_flash_cpu"}
    assert set(found["explicit"].values()) == {"explicit"}
    assert len(found["fast"]) == len(found["explicit"])


def test_ranges_exist_only_while_labelled():
    model = create_method("tome", r=4).apply(timm.create_model("test_vit").eval())
    x = torch.randn(1, 3, 160, 160)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    assert not [e for e in prof.events() if e.name.startswith(parts.PREFIX)]
    assert parts.part("mlp") is parts.part("norm")  # one shared no-op context
    with parts.labelled():
        assert parts.is_labelled()
        assert parts.part("mlp") is not parts.part("norm")
    assert not parts.is_labelled()


def test_an_unpatched_model_is_labelled_by_hooks_that_go_away():
    model = timm.create_model("test_vit").eval()
    forwards = cost.profile_forwards(model, torch.randn(1, 3, 160, 160))
    assert set(forwards[0].parts) == {*parts.MODEL_PARTS, "attention.fused"}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert "forward_head" not in vars(model) and "_pos_embed" not in vars(model)


def test_a_step_name_is_checked():
    with pytest.raises(ValueError, match="unknown step"):
        parts.step("shuffle")


def test_every_row_is_declared_and_the_library_view_adds_up():
    model = create_method("mctf", r=4).apply(timm.create_model("test_vit").eval())
    result = cost.profile_cost(model, torch.randn(2, 3, 160, 160), forwards=6)
    rows = result.metrics()
    assert all(metrics.unit_of(name) is not None for name in rows)
    assert rows["cost_ops"] > 0 and rows["cost_forwards"] == 6
    assert result.forward.low <= result.forward.value <= result.forward.high
    frame = ppt_bench.cost_breakdown(model, torch.randn(2, 3, 160, 160), forwards=2)
    assert list(frame.columns[:2]) == ["part", "ms"]
    assert frame["part"].iloc[-1] == "forward"
    body = frame[frame["part"] != "forward"]
    assert body["ms"].sum() == pytest.approx(frame["ms"].iloc[-1])
    assert frame.attrs["ops"] > 0 and "explicit" in frame.attrs["kernels"].values()


def test_a_compiled_model_gives_its_totals_and_eager_parts():
    model = create_method("tome", r=4).apply(timm.create_model("test_vit").eval())
    x = torch.randn(1, 3, 160, 160)
    compiled = torch.compile(model)
    result = cost.profile_cost(model, x, forwards=2, timed=lambda: compiled(x))
    assert result.eager_parts
    assert result.parts["method.match"].value > 0  # from the eager profile
    assert result.ops < cost.profile_cost(model, x, forwards=2).ops  # fused by the compiler


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost") / "cost.csv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PPT_BENCH_WARMUP", "1")
        mp.setenv("PPT_BENCH_ITERS", "2")
        ppt_bench.sweep(
            models=["test_vit"],
            methods=["mctf"],
            params={"r": 4},
            metrics=["macs", "throughput", "cost"],
            batch_sizes=[1, 2],
            rounds=2,
            out=str(out),
        )
    ppt_bench.write_report(out, out.with_suffix(".md"))
    return out


def test_a_run_writes_its_breakdown_and_trace(swept):
    df = ppt_bench.read_results(swept)
    assert set(df["status"]) == {"ok"}
    for (run_id, method), rows in df.groupby(["run_id", "method"]):
        names = set(rows["metric"])
        assert {"cost_forward_ms", "cost_ops", "cost_host_ms", "part_mlp_ms"} <= names
        assert any(n.startswith("part_method") for n in names) == (method != "baseline")
        assert sum(n.startswith("attn_") and "_block_" in n for n in names) == 6
        trace = swept.parent / "cost.outcomes" / "traces" / f"{run_id}.json.gz"
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
        assert any(e.get("name") == cost.FORWARD for e in events)


def test_the_report_explains_each_speed(swept):
    text = swept.with_suffix(".md").read_text()
    assert text.count("#### Where the time goes: batch size") == 2
    assert "% of ideal @1" in text and "% of ideal @2" in text
    assert "Main causes:" in text
    assert (swept.parent / "cost-breakdown.png").is_file()
    section = text.split("#### Where the time goes: batch size 1")[1].split("####")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip().split()[0] for line in lines[1:]] == ["baseline", "mctf"]


def test_the_main_cause_is_the_largest_share_over_the_ideal():
    def row(method, steps, attn, mlp, rest, ips, params="{}"):
        return pd.Series(
            {
                "method": method,
                "params": params,
                "batch_size": 1,
                "samples_per_sec": ips,
                "cost_forward_ms": steps + attn + mlp + rest,
                "cost_ops": 100.0,
                "cost_host_ms": 1.0,
                "part_method.match_ms": steps,
                "part_attention.fused_ms": attn,
                "part_mlp_ms": mlp,
                "part_norm_ms": rest,
            }
        )

    base = breakdown.breakdown(row("baseline", 0, 40, 40, 20, 10.0))  # 100 ms
    slow_steps = breakdown.breakdown(row("a", 30, 20, 20, 10, 12.5))  # 80 ms, ideal 50
    assert base.total == pytest.approx(100) and slow_steps.total == pytest.approx(80)
    assert breakdown.main_cause(slow_steps, base, 2.0) == "steps"
    slow_compute = breakdown.breakdown(row("b", 2, 35, 35, 8, 12.5))
    assert breakdown.main_cause(slow_compute, base, 2.0) == "compute"
    fast = breakdown.breakdown(row("c", 2, 18, 18, 7, 22.2))
    assert breakdown.main_cause(fast, base, 2.0) is None
