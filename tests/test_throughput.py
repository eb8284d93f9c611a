"""Throughput, latency and memory: timing arithmetic, rounds and paired speedups, OOM backoff,
CPU and CUDA paths."""

from __future__ import annotations

import math
import time

import pytest
import torch
from timm.utils import decay_batch_step
from torch import nn

from ppt_bench.core.errors import UserError
from ppt_bench.measure.throughput import (
    DEFAULT_ROUNDS,
    ITERS_ENV,
    REFRESH_WARMUP,
    WARMUP_ENV,
    alternating,
    fresh_copies,
    iterations,
    measure_latency,
    measure_throughput,
    with_oom_backoff,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Tally:
    """Forwards counted across a model and its deep copies (the timed rounds' fresh copies),
    with the instances that ran them in order."""

    def __init__(self) -> None:
        self.calls, self.instances = 0, []

    def __deepcopy__(self, memo: dict) -> Tally:
        return self


class Sleeper(nn.Module):
    """Takes ``seconds`` per forward whatever the batch; runs out of memory above ``max_batch``."""

    def __init__(self, seconds: float, max_batch: int = 1 << 20) -> None:
        super().__init__()
        self.seconds, self.max_batch, self.tally = seconds, max_batch, Tally()

    @property
    def calls(self) -> int:
        return self.tally.calls

    @calls.setter
    def calls(self, value: int) -> None:
        self.tally.calls = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        self.tally.calls += 1
        if not self.tally.instances or self.tally.instances[-1] is not self:
            self.tally.instances.append(self)
        time.sleep(self.seconds)
        return x.mean(dim=(1, 2, 3))


def test_deit_tiny_throughput_on_cpu_returns_in_seconds(make_model, one_thread):
    model = make_model("deit_tiny")
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    start = time.perf_counter()
    speed = measure_throughput(model, (3, 224, 224), batch_size=2)
    elapsed = time.perf_counter() - start
    warmup, iters = iterations()  # the defaults
    # The hook goes with each round's fresh copy: its warm-up forwards are counted too.
    assert len(calls) == warmup + iters * DEFAULT_ROUNDS + REFRESH_WARMUP * (DEFAULT_ROUNDS - 1)
    assert speed.batch_size == 2 and speed.rounds == DEFAULT_ROUNDS
    # The timed iterations took less than the whole call.
    assert speed.samples_per_sec > 2 * iters * DEFAULT_ROUNDS / elapsed
    # The median over 7 rounds has an order-statistic interval around it; no baseline, no pair.
    assert speed.throughput.low <= speed.samples_per_sec <= speed.throughput.high
    assert speed.speedup is None and speed.baseline_throughput is None
    assert speed.cpu_threads == 1 and speed.peak_mem_mb is None
    assert elapsed < 60, f"CPU throughput of deit_tiny at batch 2 took {elapsed:.1f} s"


def test_throughput_and_latency_arithmetic():
    seconds, batch = 0.01, 4
    model = Sleeper(seconds)
    speed = measure_throughput(model, (3, 8, 8), batch, warmup=2, iters=5, rounds=2)
    assert model.calls == 2 + 5 * 2 + 2  # the second round's copy warms up with 2 forwards
    # Each forward sleeps at least `seconds`, so at most batch / seconds images per second.
    assert batch / seconds / 3 < speed.samples_per_sec <= batch / seconds
    # Two rounds are too few for a 95% interval of their median: none is claimed.
    assert math.isnan(speed.throughput.low) and math.isnan(speed.throughput.high)
    model.calls = 0
    latency = measure_latency(model, (3, 8, 8), batch, warmup=1, iters=9, rounds=2)
    assert model.calls == 1 + 9 * 2 + 1  # latency times every forward of every round
    assert seconds * 1e3 <= latency.p50_ms <= latency.p90_ms < seconds * 1e3 * 20
    assert latency.p50.low <= latency.p50_ms <= latency.p50.high
    assert latency.batch_size == batch


class Twice(nn.Module):
    """The same model, run twice per forward: twice the work of the model alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model(x)
        return self.model(x)


def test_a_model_run_twice_measures_about_half_as_fast_as_itself_in_pairs(make_model, one_thread):
    model = make_model("vit_qknorm", img_size=32, patch_size=8)
    speed = measure_throughput(
        Twice(model), (3, 32, 32), 8, warmup=2, iters=4, rounds=7, baseline=model
    )
    # About 0.5x: a wide bound, since the machine is shared; the pair is timed side by side.
    assert 0.3 < speed.speedup.value < 0.75, speed
    assert speed.speedup.low <= speed.speedup.value <= speed.speedup.high
    assert speed.baseline_throughput.value > speed.throughput.value


def test_rounds_alternate_their_order_and_time_both_models_equally():
    assert alternating(4, 2) == [[0, 1], [1, 0], [0, 1], [1, 0]]
    model, base = Sleeper(0.0), Sleeper(0.0)
    speed = measure_throughput(model, (3, 4, 4), 2, warmup=3, iters=5, rounds=6, baseline=base)
    assert model.calls == base.calls == 3 + 5 * 6 + REFRESH_WARMUP * 5
    assert speed.rounds == 6


def test_each_round_after_the_first_times_fresh_copies_of_both_models():
    model, base = Sleeper(0.0), Sleeper(0.0)
    measure_throughput(model, (3, 4, 4), 2, warmup=3, iters=5, rounds=6, baseline=base)
    for original in (model, base):
        instances = original.tally.instances
        # The model itself in the first round, then a new copy for each round, used once.
        assert instances[0] is original and len(instances) == 6
        assert len({id(m) for m in instances}) == 6
        assert all(type(m) is Sleeper for m in instances)


def test_a_compiled_model_or_a_cuda_graph_is_timed_as_one_instance():
    model = nn.Linear(2, 2)
    assert fresh_copies(model) and not fresh_copies(model, cuda_graph=True)
    assert not fresh_copies(torch.compile(model))  # compiling waits for the first call


def test_a_slower_baseline_gives_a_speedup_above_one_with_an_interval():
    speed = measure_throughput(
        Sleeper(0.002), (3, 4, 4), 2, warmup=1, iters=3, rounds=6, baseline=Sleeper(0.006)
    )
    assert 1.5 < speed.speedup.value < 3.5, speed  # sleeps of 2 and 6 ms: about 3x
    assert 1.0 < speed.speedup.low <= speed.speedup.high


@pytest.mark.parametrize("rounds", [0, -1, True, 1.5])
def test_bad_rounds_are_user_errors(rounds):
    with pytest.raises(UserError, match="rounds must be a positive integer"):
        measure_throughput(Sleeper(0.0), (3, 4, 4), 2, warmup=0, iters=1, rounds=rounds)


def test_iterations_from_arguments_environment_and_defaults(monkeypatch):
    monkeypatch.delenv(WARMUP_ENV, raising=False)
    monkeypatch.delenv(ITERS_ENV, raising=False)
    assert iterations(3, 7) == (3, 7)
    monkeypatch.setenv(WARMUP_ENV, "1")
    monkeypatch.setenv(ITERS_ENV, "2")
    assert iterations() == (1, 2)
    assert iterations(iters=5) == (1, 5)
    with pytest.raises(UserError):
        iterations(0, 0)


@pytest.mark.parametrize(
    ("name", "value"),
    [(ITERS_ENV, "abc"), (ITERS_ENV, "0"), (WARMUP_ENV, "-1"), (WARMUP_ENV, "1.5")],
)
def test_bad_iteration_variables_are_user_errors_naming_them(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=f"^{name} must be an integer >= [01], got '{value}'"):
        iterations()


def test_oom_backoff_follows_timm_decay_steps():
    tried = []

    def run(batch: int) -> str:
        tried.append(batch)
        if batch > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "ok"

    result, used = with_oom_backoff(run, 64)
    expected = [64]
    while expected[-1] > 5:
        expected.append(decay_batch_step(expected[-1]))
    assert (result, used, tried) == ("ok", expected[-1], expected)


@pytest.mark.parametrize("measure", [measure_throughput, measure_latency])
def test_both_measures_record_the_batch_size_actually_used(measure):
    model = Sleeper(0.0, max_batch=3)
    result = measure(model, (3, 4, 4), 8, warmup=1, iters=2, rounds=1)
    assert result.batch_size == 3  # 8 -> 6 -> 4 -> 3
    assert model.calls == 3  # warm-up and timed forwards at the batch that fits, none before


def test_a_pair_backs_off_together_when_the_baseline_runs_out_of_memory():
    model, base = Sleeper(0.0), Sleeper(0.0, max_batch=3)  # the unreduced model needs more
    speed = measure_throughput(model, (3, 4, 4), 8, warmup=1, iters=2, rounds=1, baseline=base)
    assert speed.batch_size == 3  # both timed at the batch that fits the baseline
    assert base.calls == 3


@pytest.mark.parametrize("measure", [measure_throughput, measure_latency])
def test_out_of_memory_at_batch_one_is_a_user_error(measure):
    with pytest.raises(UserError, match="out of memory even at batch size 1"):
        measure(Sleeper(0.0, max_batch=0), (3, 4, 4), 4, warmup=0, iters=1)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_throughput_latency_and_memory(make_model, dtype):
    model = make_model("deit_tiny").cuda()
    base = make_model("deit_tiny").cuda()
    speed = measure_throughput(
        model, (3, 224, 224), 32, "cuda", dtype, warmup=3, iters=10, baseline=base
    )
    assert speed.samples_per_sec > 0 and speed.batch_size == 32
    assert speed.speedup.low <= speed.speedup.value <= speed.speedup.high
    assert speed.cpu_threads is None
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert speed.peak_mem_mb > weights_mb
    latency = measure_latency(model, (3, 224, 224), 1, "cuda", dtype, warmup=3, iters=10)
    assert 0 < latency.p50_ms <= latency.p90_ms


@needs_cuda
@pytest.mark.gpu
def test_cuda_out_of_memory_backs_off(make_model):
    model = make_model("deit_tiny").cuda()
    free, _ = torch.cuda.mem_get_info()
    # A batch whose input alone needs more than the free memory.
    too_big = int(free / (3 * 224 * 224 * 4)) + 1
    speed = measure_throughput(model, (3, 224, 224), too_big, "cuda", warmup=1, iters=1)
    assert 0 < speed.batch_size < too_big
