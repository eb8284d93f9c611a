"""The block loop: timm 1.0's ``Block`` and ``EvaBlock`` run as timm runs them (LayerScale,
qk-norm, attention output norm, gated attention, dropout, drop path), with the method's
reduction where its ``reduce_at`` says: after the attention residual (most methods), inside the
attention (the block's attention map is computed, the method reduces the block input and the
map, and the reduced map is applied to the reduced tokens' values) or after the MLP. Prefix
tokens (class, distillation, register) are carried but never reduced.

A method may carry state of its own through a forward with its tokens (GTP-ViT's token graph):
``Method.initial_state`` builds it once, from the tokens entering the first block and the patch
grid of the input, each reduction reads it as ``Features.state`` and returns the next one as
``Reduced.state``. A method that reads the attention map may also change the map its reduction
blocks apply to the values (``Method.edit_attention``: GTP-ViT's sparse attention).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from ppt_bench.core.errors import PatchError
from ppt_bench.methods import ops
from ppt_bench.methods.contract import (
    AFTER_ATTN,
    AFTER_MLP,
    ATTN,
    IN_ATTN,
    Features,
    Reduced,
    ReductionInfo,
)
from ppt_bench.methods.parts import part
from ppt_bench.methods.patch.attention import apply_attention_map, attention, attention_map
from ppt_bench.methods.patch.rope import block_rope, follow_origin, follow_positions

if TYPE_CHECKING:
    from ppt_bench.methods.base import Method


@dataclass(frozen=True)
class ReductionPlan:
    """A method bound to one model: where it reduces and how attention is computed."""

    method: Method
    locations: tuple[int, ...]
    num_prefix: int
    attn_impl: str = "fast"
    trace_source: bool = False
    track_rope: bool = False  # the model has rotary embeddings: carry each token's position
    rope_per_block: bool = False  # mixed rope: one table per block, ``[depth, H, N0, D]``

    @property
    def bias_from(self) -> int:
        """First block that sees merged sizes: proportional attention starts after it."""
        if not self.method.prop_attn or not self.locations:
            return 1 << 30
        return self.locations[0] + 1


class _State(NamedTuple):
    x: torch.Tensor  # [B, N, C]
    size: torch.Tensor  # [B, N, 1]
    source: torch.Tensor | None  # [B, N, N0]
    # Index into the rope table of the embedding each token uses, [B, N] (prefix entries unused);
    # None while the tokens are still the model's own (no reduction yet) or without rope.
    pos: torch.Tensor | None = None
    # The method's per-forward state (Method.initial_state), None for most methods.
    carried: Any = None
    # The proportional-attention bias of ``size`` ([B, 1, 1, N], ops.prop_attn_bias), built in
    # the first block that applies it after the sizes change and reused until they change again.
    bias: torch.Tensor | None = None


def layer_scale(block: nn.Module, branch: int, t: torch.Tensor) -> torch.Tensor:
    """A residual branch ``[B, N, C]`` through the block's LayerScale: timm's ``ls1`` / ``ls2``
    modules, or ``Eva``'s ``gamma_1`` / ``gamma_2`` parameters (None: no LayerScale)."""
    if hasattr(block, f"gamma_{branch}"):
        gamma = getattr(block, f"gamma_{branch}")
        return t if gamma is None else gamma * t
    return getattr(block, f"ls{branch}")(t)


def reducing_block(
    block: nn.Module,
    state: _State,
    plan: ReductionPlan,
    index: int,
    rope: torch.Tensor | None = None,
) -> tuple[_State, Mapping[str, torch.Tensor] | None]:
    """One timm ``Block`` or ``EvaBlock`` with an optional reduction where the method's
    ``reduce_at`` says: inside the attention, between attention and MLP, or after the MLP.

    Args:
        rope: the model's rope table for this block (:func:`block_rope`), or None.

    Returns:
        The new state, and the per-image figures the method reported at this block
        (``Reduced.stats``), or None where it did not reduce or reports none.
    """
    x, size, source, pos, carried, bias = state
    method = plan.method
    at = method.reduce_at if index in plan.locations else None
    if index >= plan.bias_from and bias is None:
        with part("method"):  # once per change of the sizes, not in every block
            bias = ops.prop_attn_bias(size)
    needs = method.needs if at is not None else frozenset()
    red = None
    P = plan.num_prefix
    track = plan.track_rope and rope is not None
    edit = None
    if at is not None and ATTN in needs:
        edit = partial(method.edit_attention, block=index)

    def reduce(x: torch.Tensor, feats: Features) -> tuple[Reduced, torch.Tensor | None]:
        with part("method"):
            return reduce_tracking(x, feats._replace(state=carried, needs_origin=track))

    def reduce_tracking(x: torch.Tensor, feats: Features) -> tuple[Reduced, torch.Tensor | None]:
        if not track or method.gives_origin:
            red = method.reduce(x, size, feats, block=index, num_prefix=P, source=source)
            if not track or (red.origin is None and red.x.shape[1] == x.shape[1]):
                return red, pos  # no rope, or the tokens are unchanged
            if red.origin is None:
                raise PatchError(
                    f"{method.name} declares gives_origin but reduced {x.shape[1]} tokens to "
                    f"{red.x.shape[1]} without Reduced.origin; set it or leave gives_origin off"
                )
            # A kept token keeps its own rope, a merged one its destination's.
            return red, follow_origin(red.origin, pos, P)
        # The method reduces a one-hot map of the current tokens along with any traced source,
        # which says which tokens each output token holds: its rope follows from that.
        B, N, _ = x.shape
        probe = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)
        both = probe if source is None else torch.cat([source, probe], dim=-1)
        red = method.reduce(x, size, feats, block=index, num_prefix=P, source=both)
        if red.source is None:
            raise PatchError(
                f"{method.name} neither carries the token sources nor gives_origin: it cannot "
                "reduce a model with rotary embeddings, whose positions follow the tokens"
            )
        if red.origin is not None:
            new_pos = follow_origin(red.origin, pos, P)
        else:
            new_pos = follow_positions(red.source[..., -N:], size, pos, P)
        return red._replace(source=None if source is None else red.source[..., :-N]), new_pos

    if at == IN_ATTN:
        with part("norm"):
            h = block.norm1(x)
        feats = attention_map(block.attn, h, bias, needs, block_rope(rope, pos, P), edit)
        red, pos = reduce(x, feats)
        x, size, source, carried = red.x, red.size, red.source, red.state
        with part("norm"):
            h = block.norm1(x)
        out = apply_attention_map(block.attn, h, red.attn)
    else:
        with part("norm"):
            h = block.norm1(x)
        out, feats = attention(
            block.attn, h, bias, needs, plan.attn_impl, block_rope(rope, pos, P), edit
        )
    with part("residual"):
        x = x + block.drop_path1(layer_scale(block, 1, out))
    if at == AFTER_ATTN:
        red, pos = reduce(x, feats)
        x, size, source, carried = red.x, red.size, red.source, red.state
    with part("norm"):
        h = block.norm2(x)
    with part("mlp"):
        h = block.mlp(h)
    with part("residual"):
        x = x + block.drop_path2(layer_scale(block, 2, h))
    if at == AFTER_MLP:
        red, pos = reduce(x, feats)
        x, size, source, carried = red.x, red.size, red.source, red.state
    if red is not None and red.size is not state.size:
        bias = None  # new sizes: the next block that applies the bias builds it again
    return _State(x, size, source, pos, carried, bias), None if red is None else red.stats


def run_blocks(
    blocks: nn.Sequential,
    x: torch.Tensor,
    plan: ReductionPlan,
    rope: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, ReductionInfo]:
    """Run all blocks on tokens ``x [B, N, C]`` with the plan's reductions.

    Args:
        rope: an ``Eva`` model's rotary embedding table for its patch grid, ``[N0, D]``, or
            ``[depth, H, N0, D]`` with one table per block (``plan.rope_per_block``); None
            without rope.
        grid: ``(rows, cols)`` of the patch grid, for the method's
            :meth:`~Method.initial_state`; None: a square grid of the patch tokens.
    """
    B, N, _ = x.shape
    with part("method"):  # the state a reduction keeps: sizes, sources, the method's own
        size = x.new_ones(B, N, 1)
        source = None
        if plan.trace_source:
            source = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)
        carried = None
        if plan.locations:
            P = plan.num_prefix
            if grid is None:
                side = math.isqrt(N - P)
                grid = (side, (N - P) // side)
            carried = plan.method.initial_state(x, num_prefix=P, grid=grid)
    state = _State(x, size, source, None, carried)
    tokens: list[int] = []
    stats: list[Mapping[str, torch.Tensor]] = []
    for i, block in enumerate(blocks):
        table = rope[i] if rope is not None and plan.rope_per_block else rope
        state, reported = reducing_block(block, state, plan, i, table)
        tokens.append(state.x.shape[1])
        if reported:
            stats.append(reported)
    with part("method"):
        names = stats[0] if stats else ()
        stacked = {name: torch.stack([s[name] for s in stats], dim=1) for name in names}
    info = ReductionInfo(
        tokens=tuple(tokens),
        locations=plan.locations,
        stats=stacked,
        source=state.source,
    )
    return state.x, info
