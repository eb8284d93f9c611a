"""Where a forward's time goes: a few profiled forwards, attributed to the parts of the model.

After warm-up and outside any timed round, ``forwards`` forwards run under ``torch.profiler``
(CPU activity, and CUDA activity on a GPU) with the parts' ranges open
(:mod:`ppt_bench.methods.parts`), each forward inside a ``ppt::forward`` range. From the
profile, per forward:

- each part's own time: its ranges' durations less the ranges nested in them, so that every
  part is a measured duration, never a remainder (on CUDA also its kernels' device time);
- the host time outside operators: the forward's wall time less the time of its outermost
  operators (Python, dispatch, the profiler's own bookkeeping);
- the operators launched (every ``aten::`` and custom operator event, nested ones included) and
  the host-device synchronisations (operators that need a value on the host, CUDA syncs);
- the attention kernel that ran in each block: the SDPA backend (``sdpa_flash``,
  ``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math`` on CUDA; ``sdpa_flash_cpu`` on the CPU), or
  ``explicit`` softmax attention.

The profiler slows operator-heavy code, so a report applies the parts' shares of the profiled
forward to the unprofiled timed figure. A compiled model or a CUDA graph has no ranges and no
per-operator host events: its totals and the kernels that ran come from profiling it, and its
parts from a labelled profile of the same eager model, marked ``eager_parts``.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from ppt_bench.core import cancel, stats
from ppt_bench.core.dtypes import amp_autocast
from ppt_bench.core.stats import Estimate
from ppt_bench.methods.parts import PREFIX, labelled, module_ranges
from ppt_bench.methods.patch import is_patched

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_FORWARDS = 6  # enough for the median's 95% interval (stats.median)
FORWARD = PREFIX + "forward"

# The SDPA backend an operator name stands for (CPU operators, then CUDA kernels by name).
_SDPA = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa_flash_cpu",
    "aten::_scaled_dot_product_flash_attention": "sdpa_flash",
    "aten::_scaled_dot_product_efficient_attention": "sdpa_efficient",
    "aten::_scaled_dot_product_cudnn_attention": "sdpa_cudnn",
    "aten::_scaled_dot_product_attention_math": "sdpa_math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "sdpa_overrideable",
}
_SOFTMAX = ("aten::softmax", "aten::_softmax", "aten::_safe_softmax")
KERNELS = (*_SDPA.values(), "explicit")
# Operators that wait for a value on the host (on CUDA, a device synchronisation), and the CUDA
# runtime's synchronising calls.
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::_unique2",
        "cudaStreamSynchronize",
        "cudaDeviceSynchronize",
        "cudaEventSynchronize",
    }
)


def _is_op(event: Any) -> bool:
    """An operator event (``aten::``, ``prims::``, a custom op), not a range or runtime call."""
    return "::" in event.name and not event.name.startswith(PREFIX)


def _is_range(event: Any) -> bool:
    return event.name.startswith(PREFIX) and event.name != FORWARD


def _us(event: Any) -> float:
    return event.time_range.elapsed_us()


def _device_us(event: Any) -> float:
    return float(getattr(event, "self_device_time_total", 0.0) or 0.0)


def _descendants(event: Any) -> Iterator[Any]:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


@dataclass
class Forward:
    """What one profiled forward's events add up to (times in µs).

    Attributes:
        wall_us: the forward's wall time.
        parts: each part's own time (its ranges less the ranges nested in them).
        device: each part's kernel time (CUDA).
        top_ops_us: the time of the outermost operators.
        ops: operators launched, nested ones included.
        syncs: host-device synchronisations.
        kernels: the attention kernel of each block.
        calls: attention kernels by name, any block.
    """

    wall_us: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    device: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    top_ops_us: float = 0.0
    ops: int = 0
    syncs: int = 0
    kernels: dict[int, str] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)  # attention kernels by name, any block


def _walk(event: Any, out: Forward, part: str | None, in_op: bool) -> None:
    """Attribute ``event``'s subtree: ``part`` is the innermost range around it, ``in_op``
    whether an operator encloses it."""
    for child in event.cpu_children:
        if _is_range(child):
            name = child.name[len(PREFIX) :]
            nested = sum(_us(e) for e in _outer_ranges(child))
            out.parts[name] += _us(child) - nested
            _walk(child, out, name, in_op)
        elif _is_op(child):
            out.ops += 1
            out.syncs += child.name in SYNC_OPS
            if not in_op:
                out.top_ops_us += _us(child)
            if part is not None:
                out.device[part] += _device_us(child)
            _walk(child, out, part, True)
        else:  # a runtime call (cudaLaunchKernel, a sync) or another profiler event
            out.syncs += child.name in SYNC_OPS
            _walk(child, out, part, in_op)


def _outer_ranges(event: Any) -> Iterator[Any]:
    """The part ranges nested directly in ``event`` (not inside another nested range)."""
    for child in event.cpu_children:
        if _is_range(child):
            yield child
        else:
            yield from _outer_ranges(child)


def _kernel(ops: Iterable[Any]) -> str | None:
    """The attention kernel among ``ops``: an SDPA backend, else explicit softmax."""
    names = [e.name for e in ops]
    for name in names:
        if name in _SDPA:
            return _SDPA[name]
    return "explicit" if any(n in _SOFTMAX for n in names) else None


def _block_kernels(forward: Any) -> dict[int, str]:
    """The attention kernel of each block: the ``attention.*`` ranges in time order, the block
    being the number of MLP ranges that ended before it."""
    ranges = sorted(
        (e for e in _descendants(forward) if _is_range(e)), key=lambda e: e.time_range.start
    )
    kernels, block = {}, 0
    for e in ranges:
        name = e.name[len(PREFIX) :]
        if name == "mlp":
            block += 1
        elif name.startswith("attention.") and name != "attention.cls_row":
            found = _kernel(_descendants(e))
            if found is not None:
                kernels.setdefault(block, found)
    return kernels


def _device_kernel_calls(prof: profile) -> Counter:
    """Attention kernels by name among the device kernels (a CUDA graph or compiled model)."""
    calls: Counter = Counter()
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        low = e.name.lower()
        if "flash" in low:
            calls["sdpa_flash"] += 1
        elif "fmha" in low or "efficient_attention" in low or "mem_eff" in low:
            calls["sdpa_efficient"] += 1
        elif "cudnn" in low and "attention" in low:
            calls["sdpa_cudnn"] += 1
        elif "softmax" in low:
            calls["explicit"] += 1
    return calls


def forwards_of(prof: profile) -> list[Forward]:
    """Each ``ppt::forward`` range of a profile (:func:`profile_forwards`), attributed."""
    tops = sorted((e for e in prof.events() if e.name == FORWARD), key=lambda e: e.time_range.start)
    out = []
    for top in tops:
        f = Forward(wall_us=_us(top))
        _walk(top, f, None, False)
        f.kernels = _block_kernels(top)
        f.calls = Counter(
            k for e in _descendants(top) if _is_op(e) for k in [_kernel([e])] if k is not None
        )
        out.append(f)
    return out


@dataclass(frozen=True)
class Cost:
    """The breakdown of a forward (all times in ms per forward; see the module docstring).

    Attributes:
        forward: the profiled forward's wall time, the median over forwards with its 95%
            interval.
        parts: each part's own time on the host; ``device_parts`` its kernels' time (CUDA).
        host: the forward's time outside operators.
        ops: operators launched per forward.
        syncs: host-device synchronisations per forward.
        kernels: the attention kernel of each block (from the labelled profile).
        calls: attention kernels per forward by name (from the profile of the timed model).
        forwards: forwards profiled.
        eager_parts: the parts come from a labelled eager profile of the timed model (compiled
            or captured in a CUDA graph).
    """

    forward: Estimate
    parts: dict[str, Estimate]
    device_parts: dict[str, Estimate]
    host: Estimate
    ops: float
    syncs: float
    kernels: dict[int, str]
    calls: dict[str, float]
    forwards: int
    eager_parts: bool = False

    def metrics(self) -> dict[str, Estimate | float]:
        """The tidy rows (metric -> figure) of the ``cost`` metric group."""
        out: dict[str, Estimate | float] = {
            "cost_forward_ms": self.forward,
            "cost_host_ms": self.host,
            "cost_ops": self.ops,
            "cost_syncs": self.syncs,
            "cost_forwards": float(self.forwards),
            "cost_eager_parts": float(self.eager_parts),
        }
        out.update({f"part_{name}_ms": v for name, v in self.parts.items()})
        out.update({f"part_{name}_device_ms": v for name, v in self.device_parts.items()})
        out.update({f"attn_{k}_block_{b}": 1.0 for b, k in sorted(self.kernels.items())})
        out.update({f"attn_{k}_calls": n for k, n in sorted(self.calls.items())})
        return out

    def frame(self) -> pd.DataFrame:
        """One row per part (``part``, ``ms``, ``low``, ``high``, ``share`` of the forward,
        ``device_ms`` on CUDA), then ``outside the parts`` and ``forward``; the totals in
        ``DataFrame.attrs`` (``ops``, ``syncs``, ``host_ms``, ``kernels``)."""
        import pandas as pd  # imported here: pandas is slow to import and only this needs it

        total = self.forward.value
        rows = [
            {
                "part": name,
                "ms": e.value,
                "low": e.low,
                "high": e.high,
                "share": e.value / total if total else float("nan"),
                "device_ms": self.device_parts.get(name, Estimate(float("nan"))).value,
            }
            for name, e in sorted(self.parts.items(), key=lambda kv: -kv[1].value)
        ]
        covered = sum(e.value for e in self.parts.values())
        rows.append({"part": "outside the parts", "ms": total - covered})
        rows.append(
            {
                "part": "forward",
                "ms": total,
                "low": self.forward.low,
                "high": self.forward.high,
                "share": 1.0,
            }
        )
        frame = pd.DataFrame(rows)
        frame.attrs.update(
            ops=self.ops,
            syncs=self.syncs,
            host_ms=self.host.value,
            kernels=dict(self.kernels),
            eager_parts=self.eager_parts,
        )
        return frame


def profile_forwards(model: nn.Module, x: torch.Tensor, forwards: int = 1) -> list[Forward]:
    """``forwards`` labelled forwards of ``model`` on ``x``, each attributed (no warm-up)."""
    own = contextlib.nullcontext() if is_patched(model) else module_ranges(model)
    with torch.inference_mode(), labelled(), own:
        return forwards_of(_profile(lambda: model(x), forwards, x.device.type == "cuda"))


def _profile(
    step: Callable[[], object], forwards: int, cuda: bool, trace: Path | None = None
) -> profile:
    """Run ``step`` ``forwards`` times under the profiler, each in a ``ppt::forward`` range."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(forwards):
            cancel.check()
            with record_function(FORWARD):
                step()
                if cuda:
                    torch.cuda.synchronize()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return prof


def _median(values: list[float]) -> Estimate:
    return stats.median(np.asarray(values, dtype=np.float64))


def profile_cost(
    model: nn.Module,
    x: torch.Tensor,
    *,
    forwards: int = DEFAULT_FORWARDS,
    dtype: str = "fp32",
    warmup: int = 2,
    timed: Callable[[], object] | None = None,
    trace: str | Path | None = None,
) -> Cost:
    """The breakdown of ``model``'s forward on ``x`` (see the module docstring).

    Args:
        model: the (patched or unpatched) eager model, on ``x``'s device, in eval mode.
        x: one input batch.
        forwards: profiled forwards (6 or more give the medians a 95% interval).
        dtype: ``fp32``, ``fp16`` or ``bf16`` (autocast, as the timed loops).
        warmup: unprofiled forwards first.
        timed: the step the run times, where it is not the eager forward (a compiled model's
            forward, a CUDA graph's replay): its profile gives the totals and kernels, and a
            labelled profile of ``model`` the parts.
        trace: write the profile of the timed step as a Chrome trace here (``.json`` or
            ``.json.gz``).
    """
    cuda = x.device.type == "cuda"
    trace = None if trace is None else Path(trace)
    with torch.inference_mode(), amp_autocast(x.device.type, dtype):
        eager = lambda: model(x)
        for _ in range(warmup):
            eager()
        own = contextlib.nullcontext() if is_patched(model) else module_ranges(model)
        with labelled(), own:
            parts = forwards_of(_profile(eager, forwards, cuda, None if timed else trace))
        totals, prof = parts, None
        if timed is not None:
            for _ in range(warmup):
                timed()
            prof = _profile(timed, forwards, cuda, trace)
            totals = forwards_of(prof)
    names = sorted({n for f in parts for n in f.parts})
    device = sorted({n for f in parts for n in f.device}) if cuda else []
    calls = Counter()
    for f in totals:
        calls.update(f.calls)
    if prof is not None and cuda:
        calls.update(_device_kernel_calls(prof))
    n = len(totals)
    return Cost(
        forward=_median([f.wall_us / 1e3 for f in totals]),
        parts={p: _median([f.parts.get(p, 0.0) / 1e3 for f in parts]) for p in names},
        device_parts={p: _median([f.device.get(p, 0.0) / 1e3 for f in parts]) for p in device},
        host=_median([(f.wall_us - f.top_ops_us) / 1e3 for f in totals]),
        ops=float(np.median([f.ops for f in totals])),
        syncs=float(np.median([f.syncs for f in totals])),
        kernels=parts[0].kernels if parts else {},
        calls={k: v / n for k, v in sorted(calls.items())},
        forwards=n,
        eager_parts=timed is not None,
    )


_PART_ROW = re.compile(r"part_(.+?)(_device)?_ms")


def part_of(metric: str) -> tuple[str, bool] | None:
    """``(part, device)`` of a ``part_<name>_ms`` / ``part_<name>_device_ms`` row name."""
    m = _PART_ROW.fullmatch(metric)
    return None if m is None else (m.group(1), m.group(2) is not None)
