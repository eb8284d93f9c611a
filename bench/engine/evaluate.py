"""``evaluate(spec) -> rows``: the one function every runner maps over its specs.

Build the model (and, for a reduced run, an unreduced copy: the reference of its accuracy and the
other half of its paired timing), apply the method, let each metric group that ``spec.metrics``
names measure the run (:mod:`ppt_bench.measure.metrics`), keep its per-image outcomes in the sweep's
:class:`~ppt_bench.measure.outcomes.RunStore`, and return tidy rows
(:func:`ppt_bench.results.records.make_rows`).
Errors a user can cause are raised as :class:`~ppt_bench.core.errors.UserError`; runners record a
failed run with :func:`ppt_bench.results.records.failed_rows` and go on.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from timm.utils import random_seed
from torch import nn

from ppt_bench.core.dtypes import amp_autocast
from ppt_bench.core.errors import UserError
from ppt_bench.data import imagecache
from ppt_bench.data.loader import SYNTHETIC, make_loader
from ppt_bench.measure import metrics
from ppt_bench.measure.accuracy import AccuracyResult, evaluate_accuracy
from ppt_bench.measure.cost import Cost, profile_cost
from ppt_bench.measure.outcomes import Outcomes, Reference, RunStore
from ppt_bench.measure.throughput import (
    Latency,
    Speed,
    compile_for_timing,
    measure_latency,
    measure_throughput,
    warm_step,
)
from ppt_bench.methods import create_method
from ppt_bench.methods.baseline import Baseline
from ppt_bench.models.build import build_model
from ppt_bench.results.records import make_rows
from ppt_bench.results.spec import RunSpec


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


def cache_dir(spec: RunSpec) -> Path | None:
    """Where the run reads cached images: ``spec.cache_dir``, else the user cache directory;
    None with ``cache=False``."""
    if not spec.cache:
        return None
    return Path(spec.cache_dir) if spec.cache_dir else imagecache.default_cache_dir()


class RunContext:
    """One run being measured: the patched model and what the metric groups share.

    The pass over the data and the timed loops run at most once, when a group first asks
    for them (accuracy and tokens share one pass; throughput and memory one timed loop).

    Args:
        spec: the run.
        progress: show progress bars.
        store: where the per-image outcomes and the unreduced model's outputs of the sweep are
            kept (:class:`~ppt_bench.measure.outcomes.RunStore`); None: computed for this run alone.
    """

    def __init__(self, spec: RunSpec, progress: bool = True, store: RunStore | None = None) -> None:
        self.spec = spec
        self.progress = progress
        self.store = store
        model, self.data_config = build_model(spec)
        self.input_size = tuple(self.data_config["input_size"])
        method = create_method(spec.method, **spec.params)
        # The unreduced model: the reference of accuracy (unless stored) and the other half
        # of every paired timing round. The baseline run is its own reference.
        self.reduced = not isinstance(method, Baseline)
        self.groups = [metrics.get(name) for name in spec.metrics]
        wanted = any(g.unreduced_outputs or g.paired_timing for g in self.groups)
        self._unreduced = copy.deepcopy(model) if self.reduced and wanted else None
        self.model = method.apply(model).to(spec.device)
        self.dataset = SYNTHETIC
        self.labeled = False
        self.n_images: int | None = None
        self.batch_size: int | None = None
        self.outcomes: Outcomes | None = None
        self._data: AccuracyResult | None = None
        self._speed: Speed | None = None
        self._latency: Latency | None = None
        self._cost: Cost | None = None

    def unreduced(self) -> nn.Module:
        """The unreduced model on the run's device (reduced runs only)."""
        return self._unreduced.to(self.spec.device)

    def data_pass(self) -> AccuracyResult:
        """Accuracy, agreement and token statistics over the data (computed once)."""
        if self._data is not None:
            return self._data
        spec = self.spec
        loader, self.dataset = make_loader(
            spec.data,
            self.data_config,
            spec.batch_size,
            n_images=spec.n_images,
            workers=spec.workers,
            seed=spec.seed,
            device=spec.device,
            cache_dir=cache_dir(spec),
            progress=self.progress,
            single_class=spec.single_class,
        )
        self.labeled = self.dataset != SYNTHETIC
        # Measuring accuracy, a reduced run reads the unreduced model's outputs that another
        # run of the sweep stored, else runs the unreduced model beside its own, batch by
        # batch, and stores them; the baseline's own pass stores them too. A run that computes
        # them holds the store's lock, so that runs in other processes wait and read them.
        # (Token statistics alone need no reference.)
        wants_accuracy = any(g.unreduced_outputs for g in self.groups)
        shared = self.store if wants_accuracy else None
        key = spec.reference_key if shared is not None else ""
        stored = shared.load_reference(key) if shared is not None and self.reduced else None
        computing = shared is not None and stored is None
        keep = shared is not None and not self.reduced  # the baseline's outputs, fresh
        with shared.reference_lock(key) if computing else contextlib.nullcontext():
            if computing and self.reduced:  # another process may have stored them meanwhile
                stored = shared.load_reference(key)
            reference: Reference | nn.Module | None = stored
            if self.reduced and wants_accuracy and stored is None:
                reference = self.unreduced()  # run beside the model, batch by batch
            result = self._accuracy_pass(loader, reference, keep)
            if shared is not None and result.reference is not None:  # none valid was stored
                shared.save_reference(key, result.reference)
            if keep:
                labels = torch.from_numpy(result.outcomes.label)
                shared.save_reference(key, Reference(result.log_probs, labels))
        result.log_probs, result.reference = None, None
        self.n_images, self._data = result.n_images, result
        self.outcomes = result.outcomes if wants_accuracy else None
        return result

    def _accuracy_pass(
        self, loader: Any, reference: Reference | nn.Module | None, keep: bool
    ) -> AccuracyResult:
        """One pass of the run's model over the data against ``reference`` (see
        :func:`~ppt_bench.measure.accuracy.evaluate_accuracy`), keeping its log-probabilities if
        ``keep``."""
        spec = self.spec
        result = evaluate_accuracy(
            self.model, loader, reference, spec.device, spec.dtype, spec.method, self.progress, keep
        )
        if result.n_images == 0:
            raise UserError(
                f"no readable images in {spec.data}: all {result.unreadable_images} failed"
            )
        return result

    def _timing_args(self) -> tuple[Any, ...]:
        spec = self.spec
        fast = compile_for_timing(self.model, spec.compile)
        return fast, self.input_size, spec.batch_size, spec.device, spec.dtype

    def speed(self) -> Speed:
        """Throughput and peak memory in the spec's compile mode, a reduced model's paired with
        the unreduced model's (measured once)."""
        if self._speed is None:
            spec = self.spec
            graph = spec.compile == "cudagraph"
            base = compile_for_timing(self.unreduced(), spec.compile) if self.reduced else None
            self._speed = measure_throughput(
                *self._timing_args(), cuda_graph=graph, rounds=spec.rounds, baseline=base
            )
            self.batch_size = self._speed.batch_size
        return self._speed

    def latency(self) -> Latency:
        """Latency per batch in the spec's compile mode (measured once)."""
        if self._latency is None:
            graph = self.spec.compile == "cudagraph"
            self._latency = measure_latency(
                *self._timing_args(), cuda_graph=graph, rounds=self.spec.rounds
            )
        return self._latency

    def cost(self) -> Cost:
        """Where a forward's time goes (:func:`~ppt_bench.measure.cost.profile_cost`), profiled
        at the run's batch size after the timed loops; compiled or captured in a CUDA graph,
        the timed step's totals with the eager model's parts (measured once). Its Chrome trace
        goes beside the run's outcomes."""
        if self._cost is None:
            spec = self.spec
            batch = self.batch_size or spec.batch_size
            x = torch.randn(batch, *self.input_size, device=spec.device)
            trace = None if self.store is None else self.store.trace_path(spec.run_id)
            with torch.inference_mode(), amp_autocast(spec.device, spec.dtype):
                timed = None
                if spec.compile != "none":
                    fast = compile_for_timing(self.model, spec.compile)
                    timed = warm_step(fast, x, 2, spec.compile == "cudagraph")
                self._cost = profile_cost(self.model, x, dtype=spec.dtype, timed=timed, trace=trace)
        return self._cost


def evaluate(
    spec: RunSpec, *, progress: bool = True, store: RunStore | None = None
) -> list[dict[str, Any]]:
    """Measure one run and return its rows, one per metric.

    Each entry of ``spec.metrics`` is a metric group (:mod:`ppt_bench.measure.metrics`) that writes
    its own rows: accuracy -> ``top1, top5, loss, agreement_top1, kl, unreadable_images`` (on
    synthetic data only the label-free ``agreement_top1, kl``); macs -> ``gmacs, gmacs_fvcore,
    gmacs_single_input, param_count``; throughput -> ``samples_per_sec`` (+ ``cpu_threads`` on
    the CPU); latency -> ``latency_p50_ms, latency_p90_ms``; memory -> ``peak_mem_mb`` (CUDA
    only); tokens -> ``tokens_block_<i>`` and, for ppt, ``pooled_frac_block_<i>``.

    Every estimate carries its 95% interval (``ci_low``, ``ci_high``). A reduced run also
    compares itself with the unreduced model: on labelled data ``delta_top1`` and ``p_value``
    (paired, on the same images), and with throughput the paired ``speedup`` and
    ``baseline_samples_per_sec``; throughput also records its ``timing_rounds``.

    Args:
        spec: the run.
        progress: show progress bars.
        store: keeps the run's per-image outcomes (``<run_id>.npz``) and shares the unreduced
            model's outputs between the runs of a sweep; None: nothing is kept.

    Raises:
        UserError: bad model, weights, data or device, or out of memory at batch size 1.
    """
    check_device(spec.device)
    random_seed(spec.seed)
    run = RunContext(spec, progress, store)
    values: dict[str, float] = {}
    # The data pass first (the accuracy, tokens and the MACs of adaptive methods read it).
    with oom_as_user_error(spec):
        for group in sorted(run.groups, key=lambda g: not g.needs_data):
            values.update({group.name: group.measure(run)})
    ordered = {k: v for name in spec.metrics for k, v in values[name].items()}
    if store is not None and run.outcomes is not None:  # before the rows: found with them
        store.save_outcomes(spec.run_id, run.outcomes)
    return make_rows(
        spec, ordered, dataset=run.dataset, n_images=run.n_images, batch_size=run.batch_size
    )
