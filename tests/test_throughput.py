"""Throughput, latency and memory: timing arithmetic, OOM backoff, CPU and CUDA paths."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import make_model
from timm.utils import decay_batch_step
from torch import nn

from ppt_bench.errors import UserError
from ppt_bench.throughput import (
    ITERS_ENV,
    WARMUP_ENV,
    iterations,
    measure_latency,
    measure_throughput,
    with_oom_backoff,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Sleeper(nn.Module):
    """Takes ``seconds`` per forward whatever the batch; runs out of memory above ``max_batch``."""

    def __init__(self, seconds: float, max_batch: int = 1 << 20) -> None:
        super().__init__()
        self.seconds, self.max_batch, self.calls = seconds, max_batch, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        self.calls += 1
        time.sleep(self.seconds)
        return x.mean(dim=(1, 2, 3))


@pytest.fixture
def one_thread():
    """One CPU thread: on a shared 2-core machine two threads spin against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_deit_tiny_throughput_on_cpu_returns_in_seconds(one_thread):
    model = make_model("deit_tiny")
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    start = time.perf_counter()
    speed = measure_throughput(model, (3, 224, 224), batch_size=2)
    elapsed = time.perf_counter() - start
    warmup, iters = iterations()  # the defaults
    assert len(calls) == warmup + iters
    assert speed.batch_size == 2
    # The timed iterations took less than the whole call.
    assert speed.samples_per_sec > 2 * iters / elapsed
    assert speed.cpu_threads == 1 and speed.peak_mem_mb is None
    assert elapsed < 60, f"CPU throughput of deit_tiny at batch 2 took {elapsed:.1f} s"


def test_throughput_and_latency_arithmetic():
    seconds, batch = 0.01, 4
    model = Sleeper(seconds)
    speed = measure_throughput(model, (3, 8, 8), batch, warmup=2, iters=5)
    assert model.calls == 7
    # Each forward sleeps at least `seconds`, so at most batch / seconds images per second.
    assert batch / seconds / 3 < speed.samples_per_sec <= batch / seconds
    latency = measure_latency(model, (3, 8, 8), batch, warmup=1, iters=9)
    assert seconds * 1e3 <= latency.p50_ms <= latency.p90_ms < seconds * 1e3 * 20
    assert latency.batch_size == batch


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
    result = measure(model, (3, 4, 4), 8, warmup=1, iters=2)
    assert result.batch_size == 3  # 8 -> 6 -> 4 -> 3
    assert model.calls == 3  # warm-up and timed forwards at the batch that fits, none before


@pytest.mark.parametrize("measure", [measure_throughput, measure_latency])
def test_out_of_memory_at_batch_one_is_a_user_error(measure):
    with pytest.raises(UserError, match="out of memory even at batch size 1"):
        measure(Sleeper(0.0, max_batch=0), (3, 4, 4), 4, warmup=0, iters=1)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_throughput_latency_and_memory(dtype):
    model = make_model("deit_tiny").cuda()
    speed = measure_throughput(model, (3, 224, 224), 32, "cuda", dtype, warmup=3, iters=10)
    assert speed.samples_per_sec > 0 and speed.batch_size == 32
    assert speed.cpu_threads is None
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert speed.peak_mem_mb > weights_mb
    latency = measure_latency(model, (3, 224, 224), 1, "cuda", dtype, warmup=3, iters=10)
    assert 0 < latency.p50_ms <= latency.p90_ms


@needs_cuda
@pytest.mark.gpu
def test_cuda_out_of_memory_backs_off():
    model = make_model("deit_tiny").cuda()
    free, _ = torch.cuda.mem_get_info()
    # A batch whose input alone needs more than the free memory.
    too_big = int(free / (3 * 224 * 224 * 4)) + 1
    speed = measure_throughput(model, (3, 224, 224), too_big, "cuda", warmup=1, iters=1)
    assert 0 < speed.batch_size < too_big
