"""Merge-only: PPT's pooling branch, ToMe's bipartite soft matching at fixed blocks."""

from __future__ import annotations

from dataclasses import dataclass

from ppt_bench.methods import ops
from ppt_bench.methods.base import BipartiteMerging, FixedBudget
from ppt_bench.methods.contract import Examples, Reduced


@dataclass(frozen=True)
class Merge(BipartiteMerging, FixedBudget):
    """Merge-only ablation of PPT (ToMe matching at PPT's locations).

    Args:
        r: tokens merged away per reduction block.
        locations: reduction blocks.
        prop_attn: proportional attention (``+ log(size)``) after the first reduction.
    """

    description = "PPT's pooling branch: ToMe bipartite merging of r tokens at fixed blocks"
    family = "merging"
    examples = Examples(reducing={"r": 8})

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        r = ops.max_reduction(x.shape[1], num_prefix, self.r)
        return self.merge(x, size, source, feats, r, num_prefix)
