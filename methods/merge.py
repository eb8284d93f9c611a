"""Merge-only: PPT's pooling branch, ToMe's bipartite soft matching at fixed blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppt_bench.methods import ops
from ppt_bench.methods.base import KEY_MEAN, Reduced
from ppt_bench.methods.prune import FixedBudget
from ppt_bench.methods.registry import register_method


def merge_step(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    key_mean: torch.Tensor,
    r: int,
    num_prefix: int,
) -> Reduced:
    """Merge ``r`` patch tokens into their most similar partners (size-weighted average).

    With ``r = 0`` the tokens stay as they are, in their order.
    """
    if r == 0:
        return Reduced(x, size, source)
    m = ops.bipartite_soft_matching(key_mean, r, num_prefix)
    slots = ops.merge_slots(m, x.shape[1])
    return pool_step(x, size, source, slots, x.shape[1] - r)


def pool_step(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    slots: torch.Tensor,
    num_out: int,
) -> Reduced:
    """Reduce tokens into ``num_out`` output slots by size-weighted averaging."""
    x, size = ops.pool(slots, num_out, x, size)
    return Reduced(x, size, None if source is None else ops.pool_source(slots, num_out, source))


@register_method("merge")
@dataclass(frozen=True)
class Merge(FixedBudget):
    """Merge-only ablation of PPT (ToMe matching at PPT's locations).

    Args:
        r: tokens merged away per reduction block.
        locations: reduction blocks.
        prop_attn: proportional attention (``+ log(size)``) after the first reduction.
    """

    description = "PPT's pooling branch: ToMe bipartite merging of r tokens at fixed blocks"
    needs = frozenset({KEY_MEAN})
    prop_attn: bool = True

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        r = ops.max_reduction(x.shape[1], num_prefix, self.r)
        return merge_step(x, size, source, feats.key_mean, r, num_prefix)
