"""Prune-only: PPT's pruning branch, keep the tokens with the highest ATS significance."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ppt_bench.methods import ops
from ppt_bench.methods.base import (
    CLS_ATTN,
    VALUE_NORM,
    Features,
    Method,
    Reduced,
    check_int,
    check_locations,
    set_field,
)
from ppt_bench.methods.registry import register_method

DEFAULT_LOCATIONS = (3, 6, 9)


@dataclass(frozen=True)
class FixedBudget(Method):
    """Shared parameters of methods that remove ``r`` tokens at fixed blocks.

    Args:
        r: tokens removed per reduction block (at most ``(N - P) // 2`` at each).
        locations: 0-indexed blocks where tokens are removed, after attention, before the MLP.
    """

    r: int = 50
    locations: tuple[int, ...] = field(default=DEFAULT_LOCATIONS)

    def validate(self) -> None:
        check_int("r", self.r)
        set_field(self, "locations", check_locations(self.locations))

    def locations_for(self, depth: int) -> tuple[int, ...]:
        return self.locations


def prune_step(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    scores: torch.Tensor,
    r: int,
    num_prefix: int,
) -> Reduced:
    """Drop the ``r`` patch tokens with the lowest ``scores [B, N - P]``; keep prefix tokens.

    With ``r = 0`` the tokens stay as they are, in their order.
    """
    if r == 0:
        return Reduced(x, size, source)
    N = x.shape[1]
    keep = ops.keep_top(scores, N - num_prefix - r, num_prefix)  # [B, N - r]
    return Reduced(
        ops.gather_tokens(x, keep),
        ops.gather_tokens(size, keep),
        None if source is None else ops.gather_tokens(source, keep),
    )


def ats_scores(feats: Features, num_prefix: int) -> torch.Tensor:
    """Normalised significance ``[B, N - P]`` from the class attention row and value norms."""
    return ops.significance_scores(feats.cls_attn, feats.value_norm, num_prefix)


@register_method("prune")
@dataclass(frozen=True)
class Prune(FixedBudget):
    """Prune-only ablation of PPT.

    Args:
        r: tokens removed per reduction block.
        locations: reduction blocks.
        prop_attn: proportional attention after the first reduction. Pruned tokens keep size 1,
            so it changes nothing but the kernel; off by default to keep fused attention.
    """

    description = "PPT's pruning branch: drop the r least significant tokens (ATS score)"
    needs = frozenset({CLS_ATTN, VALUE_NORM})
    prop_attn: bool = False

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        r = ops.max_reduction(x.shape[1], num_prefix, self.r)
        return prune_step(x, size, source, ats_scores(feats, num_prefix), r, num_prefix)
