"""Speed: images/s, latency per batch and peak memory, the way timm's ``benchmark.py`` measures,
in rounds, with 95% intervals, and speedups measured in pairs.

Synthetic input of the model's input size, warm-up iterations first, everything under
``torch.inference_mode`` and AMP autocast for fp16 / bf16. Throughput is timed in rounds of
``iters`` forwards; given the unreduced model as ``baseline``, its rounds alternate with the
reduced model's (ABBA), in this process on this device at the same batch size, and the speedup
is the median of the per-round ratios with its 95% interval (:mod:`ppt_bench.core.stats`): never a
ratio of two runs made at different times or places. Every round after the first times fresh
copies of the models (eager mode, :func:`fresh_copies`): where a model's weights lie in memory
moves its speed and stays fixed for one instance, so the rounds sample it and the interval
covers it, as it covers the machine's noise during the run. On CUDA the timed loop is bracketed
by CUDA events (throughput) or synchronised around each batch (latency); on the CPU it is timed
with ``time.perf_counter``. A CUDA out-of-memory error retries at a smaller batch
(``timm.utils.decay_batch_step``) and the result records the batch size actually used. The
cancellation flag (:mod:`ppt_bench.core.cancel`) is checked before each model's warm-up and
between timed rounds, never inside a timed loop.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from timm.utils import decay_batch_step
from torch import nn

from ppt_bench.core import cancel, stats
from ppt_bench.core.defaults import DEFAULT_ITERS, DEFAULT_ROUNDS, DEFAULT_WARMUP
from ppt_bench.core.dtypes import amp_autocast
from ppt_bench.core.errors import UserError
from ppt_bench.core.stats import Estimate

_logger = logging.getLogger(__name__)

# Warm-up and per-round forwards override with PPT_BENCH_WARMUP / PPT_BENCH_ITERS; 7 x 10
# forwards are about timm benchmark.py's 40 for each of the two models.
WARMUP_ENV, ITERS_ENV = "PPT_BENCH_WARMUP", "PPT_BENCH_ITERS"
# Forwards that warm each fresh copy of a model up before its round (:func:`fresh_copies`):
# the process is warm by then (kernels chosen, allocator grown), the copy's memory is not.
REFRESH_WARMUP = 2

T = TypeVar("T")


@dataclass(frozen=True)
class Speed:
    """Throughput at one batch size, measured in rounds.

    Attributes:
        throughput: images per second, the median over rounds with its 95% interval.
        batch_size: the batch size actually used (after out-of-memory backoff).
        speedup: paired against the unreduced model timed in the same rounds (None without
            one): the median of the per-round ratios of images/s, with its 95% interval.
        baseline_throughput: the unreduced model's images/s in those rounds.
        rounds: timed rounds per model.
        peak_mem_mb: peak CUDA memory of the measured model's forward in MiB (None on the CPU).
        cpu_threads: ``torch.get_num_threads()`` on the CPU (None on CUDA).
    """

    throughput: Estimate
    batch_size: int
    speedup: Estimate | None = None
    baseline_throughput: Estimate | None = None
    rounds: int = 1
    peak_mem_mb: float | None = None
    cpu_threads: int | None = None

    @property
    def samples_per_sec(self) -> float:
        return self.throughput.value


@dataclass(frozen=True)
class Latency:
    """Wall time of one forward of a whole batch, in ms per batch, with 95% intervals."""

    p50: Estimate
    p90: Estimate
    batch_size: int

    @property
    def p50_ms(self) -> float:
        return self.p50.value

    @property
    def p90_ms(self) -> float:
        return self.p90.value


def iterations(warmup: int | None = None, iters: int | None = None) -> tuple[int, int]:
    """Warm-up and timed iteration counts: arguments, else the environment, else defaults."""
    warmup = _env_int(WARMUP_ENV, DEFAULT_WARMUP, minimum=0) if warmup is None else warmup
    iters = _env_int(ITERS_ENV, DEFAULT_ITERS, minimum=1) if iters is None else iters
    if warmup < 0 or iters < 1:
        raise UserError(f"need warm-up >= 0 and timed iterations >= 1, got {warmup}, {iters}")
    return warmup, iters


def _env_int(name: str, default: int, minimum: int) -> int:
    """The integer in environment variable ``name`` (``default`` if unset)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {text!r}: fix or unset it")
    return value


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def time_total(step: Callable[[], object], iters: int, device: str) -> float:
    """Seconds for ``iters`` calls of ``step``: CUDA events on CUDA, perf_counter on the CPU."""
    if _is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return time.perf_counter() - t0


def time_each(step: Callable[[], object], iters: int, device: str) -> list[float]:
    """Seconds of each of ``iters`` calls of ``step``, synchronising CUDA around each."""
    sync = torch.cuda.synchronize if _is_cuda(device) else (lambda: None)
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def with_oom_backoff(run: Callable[[int], T], batch_size: int) -> tuple[T, int]:
    """``run(batch_size)``, retried at smaller batches after a CUDA out-of-memory error.

    Returns:
        The result and the batch size it was obtained at.

    Raises:
        UserError: out of memory even at batch size 1.
    """
    first = batch_size
    while batch_size > 0:
        try:
            return run(batch_size), batch_size
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first so the failed attempt's tensors can be freed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        smaller = decay_batch_step(batch_size)
        _logger.warning("CUDA out of memory at batch size %d, retrying at %d", batch_size, smaller)
        batch_size = smaller
    raise UserError(
        f"CUDA out of memory even at batch size 1 (asked for {first}); use a smaller model, "
        "--dtype fp16/bf16, or a GPU with more free memory"
    )


def compile_for_timing(model: nn.Module, mode: str) -> nn.Module:
    """The model to time under a :data:`~ppt_bench.core.defaults.COMPILE_MODES` mode.

    ``none`` and ``cudagraph`` (captured later, by :func:`warm_step`) time the eager model;
    the others go through ``torch.compile`` with that mode.
    """
    if mode in ("none", "cudagraph"):
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


def warm_step(
    model: nn.Module, x: torch.Tensor, warmup: int, cuda_graph: bool = False
) -> Callable[[], object]:
    """Run ``warmup`` forwards on ``x`` and return the step to time.

    With ``cuda_graph`` the forward is captured once in a CUDA graph and the step replays it:
    the GPU's own time, without Python's kernel-launch overhead. Capture fails on any host
    synchronisation in the forward. Call this inside the autocast context that the timed
    loop runs in, so autocast's cast weights stay alive for the replays.
    """
    cancel.check()
    if _is_cuda(x.device.type):
        torch.backends.cudnn.benchmark = True  # as timm's benchmark.py: pick the fastest conv
    step = lambda: model(x)
    if not cuda_graph:
        for _ in range(warmup):
            step()
        return step
    stream = torch.cuda.Stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 3)):
            step()
    torch.cuda.current_stream(x.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    return graph.replay


@dataclass(frozen=True)
class Timing:
    """What a timed loop runs: the arguments of :func:`measure_throughput` and
    :func:`measure_latency`.

    Args:
        model: in eval mode on ``device`` (optionally compiled).
        input_size: ``(3, H, W)``.
        batch_size: images per forward; lowered on CUDA out of memory.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``fp32``, ``fp16`` or ``bf16`` (autocast).
        warmup: untimed iterations per model (default :data:`DEFAULT_WARMUP` or
            ``$PPT_BENCH_WARMUP``).
        iters: timed iterations per round (default :data:`DEFAULT_ITERS` or ``$PPT_BENCH_ITERS``).
        cuda_graph: time replays of the forward captured in a CUDA graph (CUDA only).
        rounds: timed rounds (default :data:`DEFAULT_ROUNDS`); 6 or more give the medians a 95%
            interval.
        baseline: the unreduced model, timed in alternate rounds with ``model`` at the same
            batch size (throughput only), or None.
    """

    model: nn.Module
    input_size: tuple[int, ...]
    batch_size: int
    device: str = "cpu"
    dtype: str = "fp32"
    warmup: int | None = None
    iters: int | None = None
    cuda_graph: bool = False
    rounds: int = DEFAULT_ROUNDS
    baseline: nn.Module | None = None

    def run(
        self, time_round: Callable[[list[Callable[[], object]], int, int, int], T]
    ) -> tuple[list[T], int, float | None]:
        """``time_round(steps, batch_size, iters, r)`` for each round ``r``, ``steps`` being one
        forward of a synthetic batch through the model (and the baseline, second) after
        warm-up; retried at smaller batches after a CUDA out-of-memory error.

        Each round after the first times fresh deep copies of the models (see
        :func:`fresh_copies`), each warmed up with :data:`REFRESH_WARMUP` forwards.

        Returns:
            What ``time_round`` returned in each round, the batch size it was obtained at, and
            on CUDA the peak memory of the model's first warm-up at that batch size in MiB
            (None on the CPU).
        """
        warmup, iters = iterations(self.warmup, self.iters)
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise UserError(f"rounds must be a positive integer, got {self.rounds!r}")
        device = self.device
        models = [self.model] + ([] if self.baseline is None else [self.baseline])
        copies = fresh_copies(self.model, self.cuda_graph)

        def at(batch: int) -> tuple[list[T], float | None]:
            cuda = _is_cuda(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            results = []
            with torch.inference_mode(), amp_autocast(device, self.dtype):
                x = torch.randn(batch, *self.input_size, device=device)
                steps = [warm_step(models[0], x, warmup, self.cuda_graph)]
                # The model's own peak: less the baseline's weights, resident meanwhile.
                held = sum(map(_cuda_bytes, models[1:]))
                peak = (torch.cuda.max_memory_allocated(device) - held) / 2**20 if cuda else None
                steps += [warm_step(m, x, warmup, self.cuda_graph) for m in models[1:]]
                for r in range(self.rounds):
                    cancel.check()
                    if r and copies:
                        steps = fresh = None  # the last round's copies go before new ones come
                        fresh = [copy.deepcopy(m) for m in models]
                        steps = [warm_step(m, x, min(warmup, REFRESH_WARMUP)) for m in fresh]
                    results.append(time_round(steps, batch, iters, r))
            return results, peak

        (result, peak), used = with_oom_backoff(at, self.batch_size)
        return result, used, peak


def fresh_copies(model: nn.Module, cuda_graph: bool = False) -> bool:
    """Whether the timed rounds run on fresh copies of the models: in eager mode, yes.

    Where a model's weights and buffers lie in memory is fixed for the life of one instance and
    moves its speed: on a 2-core CPU, DeiT-S with ToMe at batch 16 timed in five processes, one
    instance per model each, gave paired speedups from 1.34x to 1.58x, each with an interval
    of a few percent (three of ten pairs of runs overlapping not at all). Timing each round on
    new deep copies samples that placement as the rounds sample the machine's noise, and the
    median's interval then covers it. A compiled model (``torch.compile``: a copy compiles
    again) and a CUDA graph (captured once) are timed as the one instance they are.
    """
    return not cuda_graph and not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def _cuda_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in CUDA memory."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)


def alternating(rounds: int, n: int) -> list[list[int]]:
    """The order of ``n`` models in each round: forward, then backward (ABBA...), so that a
    drift in the machine's speed favours none of them."""
    forward = list(range(n))
    return [forward if r % 2 == 0 else forward[::-1] for r in range(rounds)]


def measure_throughput(*args: Any, **kwargs: Any) -> Speed:
    """Images per second of a model on synthetic input, after warm-up, in ``rounds`` timed
    loops of ``iters`` forwards; with a ``baseline``, its loops alternate with the model's and
    each round gives one ratio.

    Args: those of :class:`Timing`, in its order.
    """
    timing = Timing(*args, **kwargs)
    device = timing.device

    def time_round(steps: list[Callable[[], object]], batch: int, iters: int, r: int) -> list:
        ips = [0.0] * len(steps)
        for i in alternating(r + 1, len(steps))[r]:
            ips[i] = batch * iters / time_total(steps[i], iters, device)
        return ips

    rounds, used, peak = timing.run(time_round)
    per_round = list(np.asarray(rounds, dtype=np.float64).T)
    paired = len(per_round) == 2
    return Speed(
        throughput=stats.median(per_round[0]),
        batch_size=used,
        speedup=stats.median(per_round[0] / per_round[1]) if paired else None,
        baseline_throughput=stats.median(per_round[1]) if paired else None,
        rounds=timing.rounds,
        peak_mem_mb=peak,
        cpu_threads=None if _is_cuda(device) else torch.get_num_threads(),
    )


def measure_latency(*args: Any, **kwargs: Any) -> Latency:
    """Median and 90th percentile wall time of one batch (ms per batch) over ``rounds`` x
    ``iters`` timed forwards after warm-up, with their order-statistic intervals; meant for
    small batch sizes (1 to 8).

    Args: those of :class:`Timing`, in its order (``baseline`` is not timed).
    """
    timing = Timing(*args, **kwargs)
    timing = dataclasses.replace(timing, baseline=None)
    device = timing.device

    def time_round(steps: list[Callable[[], object]], batch: int, iters: int, r: int) -> list:
        return time_each(steps[0], iters, device)

    rounds, used, _ = timing.run(time_round)
    times_ms = np.concatenate(rounds) * 1e3
    return Latency(stats.quantile(times_ms, 0.5), stats.quantile(times_ms, 0.9), used)
