"""ToMe: Token Merging (arXiv 2210.09461), bipartite soft matching in every block.

The merge step is PPT's pooling branch (:func:`ppt_bench.methods.ops.merge_step`); what ToMe
adds is the schedule (:mod:`ppt_bench.methods.schedule`): how many tokens each block merges
away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ppt_bench.methods.base import BipartiteMerging
from ppt_bench.methods.contract import Examples, Reduced
from ppt_bench.methods.schedule import Scheduled, per_block_r

__all__ = ["ToMe", "per_block_r"]


@dataclass(frozen=True)
class ToMe(BipartiteMerging, Scheduled):
    """Token Merging in every block, with ToMe's schedules.

    Args:
        r: tokens merged away per block, a schedule (:class:`~ppt_bench.methods.schedule.
            Scheduled`); default 13, ToMe's off-the-shelf setting for ViT-S/16.
        prop_attn: proportional attention (``+ log(size)``) after the first merge.
    """

    description = "ToMe (ICLR 2023): bipartite merging of similar tokens in every block"
    family = "merging"
    examples = Examples(
        reducing={"r": 4},
        invalid={"r": ("8", [16, -1], (16, 2.0), [16, math.nan])},
    )

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        r = self.block_r(block, x.shape[1], num_prefix)
        if r == 0:  # too few tokens left to match (ToMe's early return)
            return Reduced(x, size, source)
        return self.merge(x, size, source, feats, r, num_prefix)
