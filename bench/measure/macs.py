"""Cost in multiply-accumulates (MACs), counted by torchprofile and by fvcore.

Both trace one forward at batch size 1 in fp32 on the CPU (MACs do not depend on the device).
fvcore skips ``aten::scaled_dot_product_attention`` unless told how to count it, so it gets a
handler here; its "flops" count one multiply-accumulate as one, so its totals are MACs.

For a method whose path depends on the image (``Method.adaptive``: ppt with ``branch="auto"``
prunes or pools at each location), each distinct path is forced (``Method.on_path``) and counted
once, then weighted by how many evaluated images took it (``Method.paths``).

Operators neither counter sees (the FFTs of the dct method) are added by the method's own
formula, :meth:`~ppt_bench.methods.base.Method.uncounted_macs`, read by :func:`uncounted_macs`;
the figures include it, and ``uncounted_macs`` alone gives the part added.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from torch import nn
from torchprofile import profile_macs
from tqdm import tqdm

from ppt_bench.methods import is_patched
from ppt_bench.methods.base import Method

with warnings.catch_warnings():  # fvcore.nn's focal loss uses the deprecated torch.jit.script
    warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

Path = Hashable  # the path one image took through an adaptive method (``Method.paths``)


def param_count(model: nn.Module) -> float:
    """Parameters in millions (timm's ``param_count`` column)."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: ``q @ k^T`` plus ``attn @ v``.

    Shapes: ``q [B, H, Nq, d]``, ``k [B, H, Nk, d]``, ``v [B, H, Nk, dv]``; the count is
    ``B * H * Nq * Nk * (d + dv)``. Softmax and mask are not counted, as for other fvcore ops.
    """
    q, k, v = (get_shape(t) for t in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def macs_torchprofile(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of ``model(x)`` by ``torchprofile.profile_macs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace warnings and ops it does not count
        return int(profile_macs(model, x))


def macs_fvcore(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of ``model(x)`` by fvcore's ``FlopCountAnalysis`` with :func:`sdpa_flop_jit`."""
    analysis = (
        FlopCountAnalysis(model, x)
        .set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return int(analysis.total())


def uncounted_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of ``model(x)`` that torchprofile and fvcore do not count, by the method's formula.

    0 for an unpatched model and for every method that does not override
    :meth:`~ppt_bench.methods.base.Method.uncounted_macs`.
    """
    if not is_patched(model):
        return 0
    method = model.reduction_plan.method
    if type(method).uncounted_macs is Method.uncounted_macs:
        return 0
    with torch.inference_mode():
        embedded = model._pos_embed(model.patch_embed(x))  # an Eva's comes with its rope table
        tokens_in = (embedded[0] if isinstance(embedded, tuple) else embedded).shape[1]
        model(x)
    tokens = (tokens_in, *model.reduction_info.tokens)
    return method.uncounted_macs(tokens, model.reduction_plan.num_prefix, model.embed_dim)


def is_adaptive(model: nn.Module) -> bool:
    """Whether the patched model's path depends on the image (:attr:`Method.adaptive`)."""
    return is_patched(model) and model.reduction_plan.method.adaptive


@contextlib.contextmanager
def forced_path(model: nn.Module, path: Path) -> Iterator[nn.Module]:
    """Temporarily force an adaptive model onto one path (:meth:`Method.on_path`)."""
    plan = model.reduction_plan
    model.reduction_plan = dataclasses.replace(plan, method=plan.method.on_path(path))
    try:
        yield model
    finally:
        model.reduction_plan = plan


def path_of(model: nn.Module, x: torch.Tensor) -> Path:
    """The path an adaptive model takes on a single image ``x [1, 3, H, W]``."""
    with torch.inference_mode():
        model(x)
    return model.reduction_plan.method.paths(model.reduction_info)[0]


def _path_macs(
    model: nn.Module, x: torch.Tensor, paths: list[Path], progress: bool
) -> dict[Path, tuple[int, int]]:
    """(torchprofile, fvcore) MACs of each path, each counted once."""
    out = {}
    bar = tqdm(paths, desc="macs per path", leave=False, disable=not progress or len(paths) < 2)
    for path in bar:
        with forced_path(model, path):
            out[path] = (macs_torchprofile(model, x), macs_fvcore(model, x))
    return out


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in fp32 on the CPU, leaving the model itself where it runs."""
    info = getattr(model, "reduction_info", None)
    if info is not None:  # outputs of the last forward, possibly part of an autograd graph
        model.reduction_info = None
    try:
        return copy.deepcopy(model).float().cpu().eval()
    finally:
        if info is not None:
            model.reduction_info = info


def measure_macs(
    model: nn.Module,
    input_size: tuple[int, ...],
    path_counts: Counter[Path] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """``gmacs``, ``gmacs_fvcore``, ``gmacs_single_input`` (GMACs) and ``param_count`` (M).

    Args:
        model: the model, patched or not; a copy of it is counted on the CPU in fp32.
        input_size: ``(3, H, W)``.
        path_counts: for an adaptive model, images per path over the evaluated data (from
            :class:`ppt_bench.measure.accuracy.TokenStats`); without it, the single input's path.
        seed: seed of the single random input.
        progress: show a progress bar over the paths of an adaptive model.

    Returns:
        For an adaptive model ``gmacs`` and ``gmacs_fvcore`` are means over images, and
        ``gmacs_single_input`` is the path of one random input (the paper's figure); otherwise
        all three count one random input and include :func:`uncounted_macs`.
    """
    model = _cpu_copy(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *input_size, generator=g)
    if not is_adaptive(model):
        extra = uncounted_macs(model, x)
        tp, fv = macs_torchprofile(model, x) + extra, macs_fvcore(model, x) + extra
        return _result(tp, fv, tp, model)
    single = path_of(model, x)
    counts = Counter(path_counts) if path_counts else Counter([single])
    costs = _path_macs(model, x, sorted(set(counts) | {single}), progress)
    total = sum(counts.values())
    tp = sum(costs[p][0] * n for p, n in counts.items()) / total
    fv = sum(costs[p][1] * n for p, n in counts.items()) / total
    return _result(tp, fv, costs[single][0], model)


def _result(tp: float, fv: float, single: float, model: nn.Module) -> dict[str, float]:
    return {
        "gmacs": tp / 1e9,
        "gmacs_fvcore": fv / 1e9,
        "gmacs_single_input": single / 1e9,
        "param_count": param_count(model),
    }
