"""Merge-only: PPT's pooling branch, ToMe's bipartite soft matching at fixed blocks."""

from __future__ import annotations

from dataclasses import dataclass

from ppt_bench.methods import ops
from ppt_bench.methods.base import FixedBudget
from ppt_bench.methods.interface import KEY_MEAN
from ppt_bench.methods.ops import Reduced


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
    gives_origin = True
    prop_attn: bool = True

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        r = ops.max_reduction(x.shape[1], num_prefix, self.r)
        return ops.merge_step(x, size, source, feats.key_mean, r, num_prefix)
