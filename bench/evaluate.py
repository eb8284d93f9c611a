"""``evaluate(spec) -> rows``: the one function every runner maps over its specs.

Build the model (and an unreduced copy when accuracy is measured), apply the method, measure
what ``spec.metrics`` asks for, and return tidy rows (:func:`ppt_bench.records.make_rows`).
Errors a user can cause are raised as :class:`~ppt_bench.errors.UserError`; runners record a
failed run with :func:`failed_rows` and go on.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path as PathLib
from typing import Any

import torch
from timm.utils import random_seed
from torch import nn

from ppt_bench import imagecache
from ppt_bench.accuracy import Path, evaluate_accuracy
from ppt_bench.data import SYNTHETIC, make_loader
from ppt_bench.errors import UserError
from ppt_bench.macs import is_adaptive, measure_macs
from ppt_bench.methods import create_method
from ppt_bench.methods.baseline import Baseline
from ppt_bench.models import build_model
from ppt_bench.records import make_rows
from ppt_bench.spec import RunSpec
from ppt_bench.throughput import compile_for_timing, measure_latency, measure_throughput

# Set (to 1) by ``ppt-bench run --quiet``, and inherited by Ray workers: no progress bars.
QUIET_ENV = "PPT_BENCH_QUIET"


def progress_bars() -> bool:
    """Whether a run shows its progress bars: not when ``$PPT_BENCH_QUIET`` is set."""
    return os.environ.get(QUIET_ENV, "") in ("", "0")


@dataclass
class Measured:
    """Metrics of one run and the facts its rows record."""

    metrics: dict[str, float] = field(default_factory=dict)
    dataset: str = SYNTHETIC
    n_images: int | None = None
    batch_size: int | None = None


def check_device(device: str) -> None:
    """Raise :class:`UserError` for a CUDA device this machine does not have."""
    if torch.device(device).type != "cuda":
        return
    if not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise UserError(f"no {device}: this machine has {torch.cuda.device_count()} CUDA devices")


@contextlib.contextmanager
def oom_as_user_error(spec: RunSpec) -> Iterator[None]:
    """Turn a CUDA out-of-memory error that escaped the backoff into advice."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        raise UserError(
            f"CUDA out of memory running {spec.model} at batch size {spec.batch_size} on "
            f"{spec.device}; lower --batch-size or use --dtype fp16/bf16"
        ) from err


def cache_dir(spec: RunSpec) -> PathLib | None:
    """Where the run reads cached images: ``spec.cache_dir``, else the user cache directory;
    None with ``cache=False``."""
    if not spec.cache:
        return None
    return PathLib(spec.cache_dir) if spec.cache_dir else imagecache.default_cache_dir()


def _needs_data_pass(spec: RunSpec, model: nn.Module) -> bool:
    wants = set(spec.metrics)
    return bool(wants & {"accuracy", "tokens"}) or ("macs" in wants and is_adaptive(model))


def _measure_data(
    spec: RunSpec,
    model: nn.Module,
    reference: nn.Module | None,
    data_config: dict[str, Any],
    out: Measured,
) -> Counter[Path] | None:
    """The pass over the data (accuracy, tokens, ppt paths); returns the path counts."""
    if not _needs_data_pass(spec, model):
        return None
    loader, out.dataset = make_loader(
        spec.data,
        data_config,
        spec.batch_size,
        n_images=spec.n_images,
        workers=spec.workers,
        seed=spec.seed,
        device=spec.device,
        cache_dir=cache_dir(spec),
        progress=progress_bars(),
    )
    if reference is not None:
        reference.to(spec.device)
    result = evaluate_accuracy(
        model, loader, reference, spec.device, spec.dtype, spec.method, progress=progress_bars()
    )
    if result.n_images == 0:
        raise UserError(f"no readable images in {spec.data}: all {result.unreadable_images} failed")
    out.n_images = result.n_images
    if "accuracy" in spec.metrics:
        out.metrics.update(result.metrics(labeled=out.dataset != SYNTHETIC))
    if "tokens" in spec.metrics:
        out.metrics.update(result.tokens.metrics())
    return result.tokens.paths


def _measure_speed(
    spec: RunSpec, model: nn.Module, input_size: tuple[int, ...], out: Measured
) -> None:
    """Throughput (and peak memory on CUDA) and latency, in the spec's compile mode."""
    wants = set(spec.metrics)
    cuda = torch.device(spec.device).type == "cuda"
    fast = compile_for_timing(model, spec.compile)
    graph = spec.compile == "cudagraph"
    if "throughput" in wants or ("memory" in wants and cuda):
        speed = measure_throughput(
            fast, input_size, spec.batch_size, spec.device, spec.dtype, cuda_graph=graph
        )
        out.batch_size = speed.batch_size
        if "throughput" in wants:
            out.metrics["samples_per_sec"] = speed.samples_per_sec
            if speed.cpu_threads is not None:
                out.metrics["cpu_threads"] = speed.cpu_threads
        if "memory" in wants and speed.peak_mem_mb is not None:
            out.metrics["peak_mem_mb"] = speed.peak_mem_mb
    if "latency" in wants:
        latency = measure_latency(
            fast, input_size, spec.batch_size, spec.device, spec.dtype, cuda_graph=graph
        )
        out.metrics.update(latency_p50_ms=latency.p50_ms, latency_p90_ms=latency.p90_ms)


def evaluate(spec: RunSpec) -> list[dict[str, Any]]:
    """Measure one run and return its rows, one per metric.

    Metrics by ``spec.metrics`` entry: accuracy -> ``top1, top5, loss, agreement_top1, kl,
    unreadable_images`` (on synthetic data only the label-free ``agreement_top1, kl``);
    macs -> ``gmacs, gmacs_fvcore, gmacs_single_input, param_count``; throughput ->
    ``samples_per_sec`` (+ ``cpu_threads`` on the CPU); latency -> ``latency_p50_ms,
    latency_p90_ms``; memory -> ``peak_mem_mb`` (CUDA only); tokens -> ``tokens_block_<i>``
    and, for ppt, ``pooled_frac_block_<i>``.

    Raises:
        UserError: bad model, weights, data or device, or out of memory at batch size 1.
    """
    check_device(spec.device)
    random_seed(spec.seed)
    model, data_config = build_model(spec)
    input_size = tuple(data_config["input_size"])
    method = create_method(spec.method, **spec.params)
    # The unreduced model is its own reference: agreement 100 % and KL 0 by definition.
    wants_reference = "accuracy" in spec.metrics and not isinstance(method, Baseline)
    reference = copy.deepcopy(model) if wants_reference else None
    model = method.apply(model).to(spec.device)
    out = Measured()
    with oom_as_user_error(spec):
        paths = _measure_data(spec, model, reference, data_config, out)
        del reference
        _measure_speed(spec, model, input_size, out)
    if "macs" in spec.metrics:
        out.metrics.update(measure_macs(model, input_size, paths, spec.seed, progress_bars()))
    return make_rows(
        spec, out.metrics, dataset=out.dataset, n_images=out.n_images, batch_size=out.batch_size
    )


def error_message(exc: BaseException | str) -> str:
    """One line for the ``error`` column: a user error's own message (or a message given as
    text), else the exception's type and message."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(exc, (UserError, str)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failed_rows(spec: RunSpec, exc: BaseException | str) -> list[dict[str, Any]]:
    """The single ``status=failed`` row that records a run that raised ``exc``.

    Args:
        spec: the run.
        exc: the exception, or its message when only that survived (a crashed worker).
    """
    return make_rows(spec, {}, status="failed", error=error_message(exc))
