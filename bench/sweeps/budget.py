"""Budgets: compare methods at the same cost instead of at each method's own knob.

A budget is ``gmacs=2.9`` (GMACs per image), ``macs=0.65`` (that share of the unreduced model's
MACs) or ``speedup=1.4`` (paired speedup over the unreduced model, measured on the run's device,
dtype, batch size and compile mode). For each model, method and budget the sweep sets the
method's knob (:meth:`~ppt_bench.methods.base.Method.budget_knob`) to the value that meets the
budget, keeping the method's other parameters as given.

MAC budgets resolve without profiling the model at every probe: the knob only fixes the tokens
each block sees, and a block's cost is a polynomial in its tokens. So, once per model,

- the attention half (``norm1`` + attention) and the MLP half (``norm2`` + MLP) of one block are
  counted by torchprofile at three token counts, which fixes their quadratic and linear costs
  exactly, and the unreduced model is counted once;
- each probe runs the patched *twin* of the model (same depth, patch grid and prefix tokens, 32
  channels: the token counts of every method depend on shapes only) on one image to read the
  tokens after each block, and prices them with the polynomials, plus the method's
  :meth:`~ppt_bench.methods.base.Method.uncounted_macs` (the FFTs of dct);
- the setting the search picks is then counted by the same counter the ``macs`` metric uses
  (:func:`ppt_bench.measure.macs.measure_macs`: torchprofile plus the uncounted term). What the
  polynomials leave out (the method's own scoring and matching, the patch's class-token row) is
  the difference between the two; it moves little from one knob value to the next, so the
  search runs again with it added, and with every counted figure in place of its estimate,
  until the setting it picks is the one counted (after eight counts without settling, the
  costliest setting counted within the budget). One count per budget is the usual cost.

An ``int`` or ``choice`` knob takes the value whose counted MACs are the largest not above the
budget; a ``float`` knob the value on the budget's side of the step where the cost crosses it,
rounded to its digits. An adaptive method (ppt with ``branch="auto"``) is priced on its
costlier path, so that no mix of images exceeds the budget. A budget below what the knob can
reach (or a method with a reason instead of a knob on the model) is a :class:`Resolution` with a
``reason``: the sweep records it as a skipped run and goes on.

Speed budgets start from the MAC budget ``1 / speedup`` and search the knob on the measured
paired speedup (:func:`ppt_bench.measure.throughput.measure_throughput` against the unreduced
model): each probe times both models in alternating rounds, so one budget costs several timed runs.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import timm
import torch
from tabulate import tabulate
from torch import nn

from ppt_bench.core import cancel
from ppt_bench.core.errors import UserError
from ppt_bench.measure.macs import macs_torchprofile, uncounted_macs
from ppt_bench.measure.throughput import compile_for_timing, measure_throughput
from ppt_bench.methods import create_method
from ppt_bench.methods.contract import AFTER_ATTN, IN_ATTN, Knob
from ppt_bench.methods.patch import patch, vit_info
from ppt_bench.models.build import build_model, describe_vit, unpatchable_reason
from ppt_bench.results.records import append_rows, make_rows

if TYPE_CHECKING:
    from ppt_bench.core.stats import Estimate
    from ppt_bench.methods.base import Method
    from ppt_bench.results.spec import RunSpec

KINDS = ("gmacs", "macs", "speedup")
_HELP = "gmacs=2.9 (GMACs per image), macs=0.65 (share of the unreduced MACs) or speedup=1.4"
# Channels of the twin that reads token counts: a multiple of the heads it is built with.
_TWIN_DIM, _TWIN_HEADS = 32, 2


@dataclass(frozen=True)
class Budget:
    """One budget: ``kind`` (:data:`KINDS`) and its value."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        """``macs=0.7``: the budget as it is written in a results row and a report."""
        return f"{self.kind}={self.value:g}"

    def target_gmacs(self, base_gmacs: float) -> float:
        """The budget in GMACs per image (a speed budget: its MAC starting point)."""
        if self.kind == "gmacs":
            return self.value
        if self.kind == "macs":
            return self.value * base_gmacs
        return base_gmacs / self.value


def parse_budget(text: Any) -> Budget:
    """Read ``gmacs=2.9``, ``macs=0.65`` or ``speedup=1.4``.

    Raises:
        UserError: anything else, or a value out of range (a share in (0, 1], a speedup >= 1).
    """
    if isinstance(text, Budget):
        return text
    kind, sep, value = str(text).partition("=")
    kind = kind.strip().lower()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or kind not in KINDS or not math.isfinite(number) or number <= 0:
        raise UserError(f"a budget is {_HELP}, got {text!r}")
    if kind == "macs" and number > 1:
        raise UserError(f"a macs budget is a share of the unreduced MACs in (0, 1], got {text!r}")
    if kind == "speedup" and number < 1:
        raise UserError(f"a speedup budget is at least 1 (the unreduced model), got {text!r}")
    return Budget(kind, number)


@dataclass(frozen=True)
class Resolution:
    """A method resolved at one budget on one model.

    Attributes:
        model, method: names.
        budget: the budget's label (``macs=0.7``).
        params: the method's parameters with the knob set (None when skipped).
        knob: the knob's parameter name ('' when there is none).
        value: the knob's value.
        target_gmacs: the budget in GMACs (for a speed budget, its MAC starting point).
        gmacs: the counted GMACs of the resolved setting.
        share: ``gmacs`` over the unreduced model's.
        speedup: for a speed budget, the measured paired speedup of the setting, with its
            interval.
        reason: why the method was not run at this budget (a skipped run), else ''.
        counts: full counts by the MAC counter it took.
    """

    model: str
    method: str
    budget: str
    params: dict[str, Any] | None
    knob: str = ""
    value: Any = None
    target_gmacs: float = math.nan
    gmacs: float = math.nan
    share: float = math.nan
    speedup: Estimate | None = None
    reason: str = ""
    counts: int = 0

    @property
    def skipped(self) -> bool:
        return bool(self.reason)

    def at(
        self,
        params: dict[str, Any],
        knob: Knob,
        value: Any,
        gmacs: float,
        base_gmacs: float,
        **more: Any,
    ) -> Resolution:
        """This resolution with ``knob`` set to ``value`` in ``params``, counted at ``gmacs``
        of the unreduced model's ``base_gmacs``."""
        return dataclasses.replace(
            self,
            params={**params, knob.param: value},
            knob=knob.param,
            value=value,
            gmacs=gmacs,
            share=gmacs / base_gmacs,
            **more,
        )

    def record(self) -> dict[str, Any]:
        """What a run's row records of its budget (``RunSpec.budget``): the label, the budget
        in GMACs (a MAC budget), the achieved share and, for a speed budget, the measured
        speedup of the setting with its interval (``1.42 [1.38, 1.47]``)."""
        out = {"budget": self.budget, "share": None if self.skipped else self.share}
        if self.budget.startswith("speedup"):
            s = self.speedup
            out["speedup"] = "" if s is None else f"{s.value:.3f} [{s.low:.3f}, {s.high:.3f}]"
        else:
            out["target_gmacs"] = self.target_gmacs
        return out


class _Part(nn.Module):
    """One half of a block, for counting it alone: ``norm`` then ``fn``."""

    def __init__(self, norm: nn.Module, fn: nn.Module) -> None:
        super().__init__()
        self.norm, self.fn = norm, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


def _quadratic(points: dict[int, int]) -> np.ndarray:
    """Coefficients ``[c2, c1, c0]`` of the quadratic through three ``n -> MACs`` points."""
    n = np.array(sorted(points), dtype=np.float64)
    return np.linalg.solve(np.vander(n, 3), np.array([points[k] for k in sorted(points)], float))


class ModelCost:
    """The cost model of one timm ViT, built once and shared by every method and budget.

    Args:
        name: timm model name (random weights: MACs depend on shapes only).
        model: the model itself, instead of building it from ``name``.
    """

    def __init__(self, name: str, model: nn.Module | None = None) -> None:

        self.name = name
        if model is None:
            model, _ = build_model(name)
        self.model = copy.deepcopy(model).float().cpu().eval()
        self.info = dataclasses.replace(vit_info(self.model), name=name)
        self.input_size = tuple(self.model.patch_embed.img_size)
        self.x = torch.randn(1, 3, *self.input_size, generator=torch.Generator().manual_seed(0))
        self.base_gmacs = macs_torchprofile(self.model, self.x) / 1e9
        self.n0 = self.info.patch_tokens + self.info.prefix_tokens
        block = self.model.blocks[0]
        norm2 = getattr(block, "norm2", nn.Identity())
        attn, mlp = _Part(block.norm1, block.attn), _Part(norm2, block.mlp)
        sizes = sorted({self.n0, max(self.n0 // 2, 2), max(self.n0 // 4, 1)})
        while len(sizes) < 3:
            sizes.append(sizes[-1] + 1)
        dim = self.info.embed_dim
        self.attn = _quadratic({n: macs_torchprofile(attn, torch.randn(1, n, dim)) for n in sizes})
        self.mlp = _quadratic({n: macs_torchprofile(mlp, torch.randn(1, n, dim)) for n in sizes})
        self.twin = self._twin(model)
        self._patched: nn.Module | None = None
        self.offsets: dict[Any, float] = {}  # (method, fixed params) -> counted less estimated

    def _fresh(self) -> nn.Module:
        """A copy of the unreduced model."""
        return copy.deepcopy(self.model)

    def _twin(self, model: nn.Module) -> nn.Module:
        """The model with 32 channels (same tokens per block), or a copy where timm cannot
        build one."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                twin = timm.create_model(
                    self.name, pretrained=False, embed_dim=_TWIN_DIM, num_heads=_TWIN_HEADS
                ).eval()
            same = (
                len(twin.blocks) == self.info.depth
                and twin.patch_embed.num_patches == self.info.patch_tokens
                and twin.num_prefix_tokens == self.info.prefix_tokens
            )
            if same:
                return twin
        except Exception:  # a model whose constructor takes no embed_dim (the digits model)
            pass
        return copy.deepcopy(model).float().cpu().eval()

    def tokens(self, method: Method) -> tuple[int, ...]:
        """Tokens entering each block, then after the last (``L + 1`` counts)."""

        patch(self.twin, method, replace=True)  # the twin is patched again for each probe
        with torch.inference_mode():
            self.twin(self.x)
        return (self.n0, *self.twin.reduction_info.tokens)

    def estimate(self, method: Method) -> float:
        """GMACs per image of ``method`` by the polynomials (see the module docstring)."""

        tokens = self.tokens(method)
        depth = self.info.depth
        locations = set(method.locations_for(depth))
        attn = lambda n: float(np.polyval(self.attn, n))
        mlp = lambda n: float(np.polyval(self.mlp, n))
        total = self.base_gmacs * 1e9 - depth * (attn(self.n0) + mlp(self.n0))
        for i in range(depth):
            n_in, n_out = tokens[i], tokens[i + 1]
            at = method.reduce_at if i in locations else None
            if at == AFTER_ATTN:
                total += attn(n_in) + mlp(n_out)
            elif at == IN_ATTN:  # scores on the block's tokens, values on the fused ones
                total += (attn(n_in) + attn(n_out)) / 2 + mlp(n_out)
            else:
                total += attn(n_in) + mlp(n_in)
        total += method.uncounted_macs(tokens, self.info.prefix_tokens, self.info.embed_dim)
        return total / 1e9

    def count(self, method: Method) -> float:
        """GMACs per image by the ``macs`` metric's counter (the ``gmacs`` of
        :func:`ppt_bench.measure.macs.measure_macs`: torchprofile plus the uncounted term, fvcore
        left out); an adaptive method on its costlier uniform path (every location pooled, or every
        location pruned)."""

        if self._patched is None:
            self._patched = self._fresh()
        methods = [method]
        if method.adaptive:
            n = len(method.locations_for(self.info.depth))
            methods = [method.on_path((flag,) * n) for flag in (True, False)]
        counts = []
        for m in methods:
            model = patch(self._patched, m, replace=True)  # one copy, patched for each probe
            counts.append(macs_torchprofile(model, self.x) + uncounted_macs(model, self.x))
        return max(counts) / 1e9


_COSTS: dict[str, ModelCost] = {}


def model_cost(name: str) -> ModelCost:
    """The :class:`ModelCost` of a timm model, built on first use."""
    if name not in _COSTS:
        _COSTS[name] = ModelCost(name)
    return _COSTS[name]


def _knob_of(name: str, params: dict[str, Any], info: Any) -> tuple[Knob | None, str]:

    knob = create_method(name, **params).budget_knob(info)
    if knob is None:
        raise UserError(
            f"{name} declares no budget knob (Method.budget_knob): run it without --budget"
        )
    if isinstance(knob, str):
        return None, knob
    if knob.param in params:
        raise UserError(
            f"{name}: {knob.param} is the knob a budget sets; drop --param/--sweep {knob.param} "
            "or the budget"
        )
    return knob, ""


def _ordered(knob: Knob) -> list[Any]:
    """An ``int`` knob's values from the least reduction to the most."""
    values = list(knob.values())
    return values if knob.more_at_high else values[::-1]


def resolve_macs(
    cost: ModelCost, name: str, params: dict[str, Any], budget: Budget | str
) -> Resolution:
    """Set ``name``'s knob so that its counted GMACs meet a MAC budget on ``cost``'s model.

    Args:
        cost: the model's cost model.
        name: method name.
        params: the method's other parameters.
        budget: a ``gmacs`` or ``macs`` budget (a speed budget gives its MAC starting point).

    Returns:
        The resolution; out of reach or without a knob on this model: one with a ``reason``.
    """

    budget = parse_budget(budget)
    target = budget.target_gmacs(cost.base_gmacs)
    base = Resolution(cost.name, name, budget.label, None, target_gmacs=target)
    knob, reason = _knob_of(name, params, cost.info)
    if knob is None:
        return dataclasses.replace(base, reason=reason)
    key = (name, repr(sorted(params.items())))
    counted: dict[Any, float] = {}
    estimates: dict[Any, float] = {}

    def method(value: Any) -> Method:
        return create_method(name, **{**params, knob.param: value})

    def cost_of(value: Any) -> float:  # counted where counted, else estimated plus the offset
        if value in counted:
            return counted[value]
        if value not in estimates:
            estimates[value] = cost.estimate(method(value))
        return estimates[value] + cost.offsets.get(key, 0.0)

    for _ in range(8):
        value = _search(knob, cost_of, target)
        if value is None:  # even the most reduction is above the budget by the estimate
            if knob.kind == "choice":  # the cheapest choice by the estimate
                most = min(knob.choices, key=cost_of)
            else:
                most = _ordered(knob)[-1] if knob.kind == "int" else _extreme(knob)
            if most not in counted:
                cost_of(most)  # its estimate
                counted[most] = cost.count(method(most))
                cost.offsets[key] = counted[most] - estimates[most]
            if counted[most] > target:
                return dataclasses.replace(
                    base,
                    knob=knob.param,
                    reason=f"{name} cannot reach {budget.label} ({target:.3g} GMACs) on "
                    f"{cost.name}: at {knob.param}={most} it still costs {counted[most]:.3g}",
                )
            continue
        if value in counted:
            break
        cost_of(value)  # its estimate (a rounded float value was not probed)
        counted[value] = cost.count(method(value))
        cost.offsets[key] = counted[value] - estimates[value]
    else:  # not settled: the costliest setting counted within the budget
        value = max((v for v in counted if counted[v] <= target), key=counted.get, default=None)
        if value is None:
            raise RuntimeError(f"{name}: the budget search did not settle on {cost.name}")
    return base.at(params, knob, value, counted[value], cost.base_gmacs, counts=len(counted))


def _extreme(knob: Knob) -> float:
    """The most reducing value of a float knob."""
    return knob.high if knob.more_at_high else knob.low


def _search(knob: Knob, cost_of: Callable[[Any], float], target: float) -> Any:
    """The value meeting ``target`` by ``cost_of`` (non-increasing toward more reduction), or
    None when even the most reduction costs more."""
    if knob.kind == "choice":
        fits = [(cost_of(v), i, v) for i, v in enumerate(knob.choices)]
        fits = [f for f in fits if f[0] <= target]
        return max(fits)[2] if fits else None
    if knob.kind == "int":
        values = _ordered(knob)
        if cost_of(values[-1]) > target:
            return None
        lo, hi = -1, len(values) - 1  # cost(values[lo]) > target (or lo = -1), cost(hi) <= target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cost_of(values[mid]) <= target:
                hi = mid
            else:
                lo = mid
        return values[hi]
    # float: bisect between the least and the most reduction to the knob's digits
    scale = 10**knob.digits
    least, most = (knob.low, knob.high) if knob.more_at_high else (knob.high, knob.low)
    if cost_of(most) > target:
        return None
    if cost_of(least) <= target:
        return least
    bad, good = least, most
    while abs(good - bad) * scale > 1:
        mid = (bad + good) / 2
        if cost_of(mid) <= target:
            good = mid
        else:
            bad = mid
    # Round toward more reduction: by monotony the rounded value meets the budget too.
    rounded = (math.ceil if knob.more_at_high else math.floor)(good * scale) / scale
    return min(max(rounded, knob.low), knob.high)


# -- speed budgets ----------------------------------------------------------------------------


def search_speed(
    values: Sequence[Any],
    start: int,
    speedup: Callable[[Any], Estimate],
    target: float,
) -> tuple[int | None, dict[int, Estimate]]:
    """The least reducing of ``values`` (ordered from least to most reduction) whose measured
    speedup reaches ``target``, searched from index ``start``.

    Args:
        values: knob values, least reduction first.
        start: where to begin (the MAC budget's resolution).
        speedup: measures one value's paired speedup (median with its interval).
        target: the speedup to reach.

    Returns:
        The index (None when not even the last value reaches it) and every measurement.
    """
    seen: dict[int, Estimate] = {}

    def fast(i: int) -> bool:
        if i not in seen:
            seen[i] = speedup(values[i])
        return seen[i].value >= target

    last = len(values) - 1
    start = min(max(start, 0), last)
    step = 1
    if fast(start):  # gallop toward less reduction until one is too slow
        hi, lo = start, start - step
        while lo >= 0 and fast(lo):
            hi, step = lo, step * 2
            lo = hi - step
        lo = max(lo, -1)
    else:  # gallop toward more reduction until one is fast enough
        lo, hi = start, start + step
        while hi <= last and not fast(hi):
            lo, step = hi, step * 2
            hi = lo + step
        if hi > last:
            if lo == last or not fast(last):
                return None, seen
            hi = last
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fast(mid):
            hi = mid
        else:
            lo = mid
    return hi, seen


def resolve_speed(
    cost: ModelCost,
    name: str,
    params: dict[str, Any],
    budget: Budget | str,
    spec: RunSpec,
    float_step: float = 0.01,
) -> Resolution:
    """Set ``name``'s knob so that its measured paired speedup over the unreduced model meets a
    speed budget at ``spec``'s device, dtype, batch size, compile mode and rounds.

    A ``float`` knob is searched on a grid of ``float_step``; each probe is one paired timing.
    """

    budget = parse_budget(budget)
    start = resolve_macs(cost, name, params, budget)
    if start.skipped and start.knob == "":
        return start
    knob, _ = _knob_of(name, params, cost.info)
    if knob.kind == "float":
        first, last = math.ceil(knob.low / float_step), math.floor(knob.high / float_step)
        values = [round(k * float_step, 6) for k in range(first, last + 1)]
        values = values if knob.more_at_high else values[::-1]
    elif knob.kind == "int":
        values = _ordered(knob)
    else:
        values = sorted(knob.choices, key=lambda v: -cost.estimate(create_method(name, schedule=v)))
    begin = len(values) - 1 if start.skipped else _nearest(values, start.value)
    device = spec.device
    base = compile_for_timing(copy.deepcopy(cost.model).to(device), spec.compile)

    def measure(value: Any) -> Estimate:
        model = create_method(name, **{**params, knob.param: value}).apply(
            copy.deepcopy(cost.model).to(device)
        )
        model = compile_for_timing(model, spec.compile)
        speed = measure_throughput(
            model,
            (3, *cost.input_size),
            spec.batch_size,
            device,
            spec.dtype,
            rounds=spec.rounds,
            baseline=base,
        )
        return speed.speedup

    index, seen = search_speed(values, begin, measure, budget.value)
    if index is None:
        best = max(seen.values(), key=lambda e: e.value)
        return dataclasses.replace(
            start,
            params=None,
            reason=f"{name} cannot reach {budget.label} on {cost.name} at batch size "
            f"{spec.batch_size}: its fastest measured setting runs at {best.value:.2f}x",
        )
    value = values[index]
    gmacs = cost.count(create_method(name, **{**params, knob.param: value}))
    return start.at(
        params,
        knob,
        value,
        gmacs,
        cost.base_gmacs,
        speedup=seen[index],
        reason="",
    )


def _nearest(values: Sequence[Any], value: Any) -> int:
    if value in values:
        return list(values).index(value)
    return min(range(len(values)), key=lambda i: abs(float(values[i]) - float(value)))


# -- sweeps -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """A sweep's runs at its budgets: what to run and what was skipped, with the table
    ``--plan`` prints."""

    specs: list[RunSpec] = field(default_factory=list)
    skipped: list[tuple[RunSpec, str]] = field(default_factory=list)
    rows: list[Resolution] = field(default_factory=list)

    def table(self) -> str:
        """model, method, budget, knob value, achieved GMACs and share, one row each."""

        rows = []
        for r in self.rows:
            value = "-" if r.skipped else f"{r.knob}={r.value}"
            gmacs = "-" if r.skipped else f"{r.gmacs:.4g}"
            share = "-" if r.skipped else f"{r.share:.1%}"
            speed = "" if r.speedup is None else f"{r.speedup.value:.2f}x"
            rows.append([r.model, r.method, r.budget, value, gmacs, share, speed, r.reason])
        headers = ["model", "method", "budget", "setting", "GMACs", "share", "speedup", "skipped"]
        if not any(r.speedup is not None for r in self.rows):
            headers.remove("speedup")
            rows = [row[:6] + row[7:] for row in rows]
        if not any(r.skipped for r in self.rows):
            headers.pop()
            rows = [row[:-1] for row in rows]
        return tabulate(rows, headers, tablefmt="github")


def resolve_sweep(
    specs: Sequence[RunSpec], budgets: Sequence[Budget | str], *, measure: bool = True
) -> Plan:
    """Each non-baseline run of ``specs`` at each budget: its knob set, or a skipped run.

    MAC budgets resolve once per model, method and parameters (whatever the batch size, dtype
    or compile mode); speed budgets once per run, since they are measured (without ``measure``:
    at their MAC starting point, timing nothing).

    Raises:
        UserError: a method without a knob, or a knob also given as a parameter.
    """
    budgets = [parse_budget(b) for b in budgets]
    plan = Plan()
    done: dict[Any, Resolution] = {}

    for spec in specs:
        if spec.method == "baseline":
            plan.specs.append(spec)
            continue
        if describe_vit(spec.model) is None:
            raise UserError(
                f"{spec.method!r} cannot reduce the tokens of {spec.model!r}: "
                f"{unpatchable_reason(spec.model)}"
            )
        for budget in budgets:
            cancel.check()
            cost = model_cost(spec.model)
            if budget.kind == "speedup" and measure:
                key: Any = (spec.run_id, budget.label)
            else:
                key = (spec.model, spec.method, repr(sorted(spec.params.items())), budget.label)
            if key not in done:
                if budget.kind == "speedup" and measure:
                    done[key] = resolve_speed(cost, spec.method, spec.params, budget, spec)
                else:
                    done[key] = resolve_macs(cost, spec.method, spec.params, budget)
                plan.rows.append(done[key])
            res = done[key]
            params = spec.params if res.params is None else res.params
            resolved = spec.replace(params=params, budget=res.record())
            if res.skipped:
                plan.skipped.append((resolved, res.reason))
            else:
                plan.specs.append(resolved)
    return plan


def record_skipped(skipped: Sequence[tuple[RunSpec, str]], out: Any) -> int:
    """Write each skipped run as one ``status=skipped`` row with its reason, unless the results
    file has it already; returns how many were skipped."""

    path = Path(out)
    seen: set[str] = set()
    if path.exists():
        with path.open(newline="") as f:
            seen = {row["run_id"] for row in csv.DictReader(f)}
    for spec, reason in skipped:
        if spec.run_id not in seen:
            append_rows(path, make_rows(spec, {}, status="skipped", error=reason))
            seen.add(spec.run_id)
    return len(skipped)


__all__ = [
    "Budget",
    "ModelCost",
    "Plan",
    "Resolution",
    "model_cost",
    "parse_budget",
    "record_skipped",
    "resolve_macs",
    "resolve_speed",
    "resolve_sweep",
    "search_speed",
]
