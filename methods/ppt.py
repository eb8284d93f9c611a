"""PPT: token Pruning & Pooling (arXiv 2310.01812).

At each location, per image: if the ATS significance scores are spread out (variance at or
above ``threshold``) the least significant tokens are pruned, otherwise (flat scores, no token
stands out) similar tokens are pooled with ToMe's bipartite matching. Both branches remove the
same number of tokens, so the batch stays rectangular: each image's output slots are chosen with
``torch.where`` and one scatter reduces the whole batch, with no host synchronisation and no
batch split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ppt_bench.core.errors import MethodError
from ppt_bench.methods import ops
from ppt_bench.methods.base import FixedBudget, Method, check_float, set_field
from ppt_bench.methods.contract import CLS_ATTN, KEY_MEAN, VALUE_NORM, Examples, Reduced
from ppt_bench.methods.prune import ats_scores

if TYPE_CHECKING:
    from ppt_bench.methods.contract import ReductionInfo

BRANCHES = ("auto", "prune", "pool")


def score_variance(scores: torch.Tensor) -> torch.Tensor:
    """The unbiased variance of each image's scores, ``[B, T] -> [B]``, with no host sync.

    On a CPU, ``var`` over a whole tensor (a batch of one) reads the mean on the host; over two
    broadcast copies of the batch it runs the per-row kernel, whose figures are the same.
    """
    return scores.expand(2, *scores.shape).var(dim=-1, correction=1)[0]


@dataclass(frozen=True)
class PPT(FixedBudget):
    """Adaptive pruning and pooling.

    Args:
        r: tokens removed per reduction block (default 50).
        locations: reduction blocks (default 3, 6, 9).
        threshold: pool an image when the variance of its significance scores is below this
            (default 7e-5); 0 always prunes, inf always pools.
        prop_attn: proportional attention after the first reduction (default true).
        branch: ``"auto"`` (per image, by ``threshold``), or force ``"prune"`` / ``"pool"``,
            as one value or one per location; a forced branch computes only that branch, which
            is how the cost of each path is measured.
    """

    description = "PPT (arXiv 2310.01812): per image, prune by significance or pool similar tokens"
    family = "hybrid"
    examples = Examples(
        reducing={"r": 8, "threshold": 0.0001},
        invalid={"branch": ("sideways",), "locations": ("abc",)},
    )
    needs = frozenset({CLS_ATTN, VALUE_NORM, KEY_MEAN})
    gives_origin = True
    threshold: float = 7e-5
    prop_attn: bool = True
    branch: str | tuple[str, ...] = "auto"

    def validate(self) -> None:
        given = self.locations
        super().validate()
        set_field(self, "threshold", check_float("threshold", self.threshold))
        branches = (self.branch,) if isinstance(self.branch, str) else tuple(self.branch)
        if len(branches) > 1 and tuple(given) != self.locations:
            raise MethodError(
                f"with a branch per location, give the locations in increasing order, each "
                f"branch in its place: got locations {list(given)} and branch {list(branches)}"
            )
        if any(b not in BRANCHES for b in branches) or (
            len(branches) > 1 and len(branches) != len(self.locations)
        ):
            raise MethodError(
                f"branch must be one of {BRANCHES} or a list of 'prune'/'pool' with one entry per "
                f"location ({len(self.locations)}), got {self.branch!r}"
            )
        set_field(self, "branch", branches[0] if len(branches) == 1 else branches)

    @property
    def adaptive(self) -> bool:
        """Each image chooses its branch at each location (``branch="auto"``)."""
        return self.branch == "auto" and bool(self.locations)

    def paths(self, info: ReductionInfo) -> list[Hashable]:
        """Per image, one flag per location: True where it was pooled."""
        if "pooled" not in info.stats:
            return []
        return [tuple(row) for row in info.stats["pooled"].tolist()]

    def on_path(self, path: Hashable) -> Method:
        """Pool where ``path`` is True, prune elsewhere."""
        return dataclasses.replace(self, branch=tuple("pool" if p else "prune" for p in path))

    def branch_at(self, block: int) -> str:
        if isinstance(self.branch, str):
            return self.branch
        return self.branch[self.locations.index(block)]

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        r = ops.max_reduction(x.shape[1], num_prefix, self.r)
        scores = ats_scores(feats, num_prefix)  # [B, N - P]
        score_var = score_variance(scores)  # [B]
        branch = self.branch_at(block)
        if branch == "prune" or (branch == "auto" and self.threshold == 0.0):
            pooled = torch.zeros_like(score_var, dtype=torch.bool)
            return ops.prune_step(x, size, source, scores, r, num_prefix)._replace(
                stats={"pooled": pooled, "score_var": score_var}
            )
        if branch == "pool" or (branch == "auto" and math.isinf(self.threshold)):
            pooled = torch.ones_like(score_var, dtype=torch.bool)
            step = ops.merge_step(
                x, size, source, feats.key_mean, r, num_prefix, origin=feats.needs_origin
            )
            return step._replace(stats={"pooled": pooled, "score_var": score_var})
        # Both branches remove r tokens: each image picks its output slots, one pass reduces all.
        pooled = score_var < self.threshold  # [B]
        if r == 0:  # nothing to remove: the tokens stay in their order
            return Reduced(x, size, source, {"pooled": pooled, "score_var": score_var})
        N = x.shape[1]
        keep = ops.keep_top(scores, N - num_prefix - r, num_prefix)
        matching = ops.bipartite_soft_matching(feats.key_mean, r, num_prefix)
        by_image = pooled.view(-1, 1)
        merge_slots, kept = ops.merge_layout(matching, N, kept=feats.needs_origin)
        slots = torch.where(by_image, merge_slots, ops.prune_slots(keep, N))  # [B, N]
        # Each output token descends from its merge destination, or is a kept token itself.
        origin = None if kept is None else torch.where(by_image, kept, keep)  # [B, N - r]
        return ops.pool_step(x, size, source, slots, N - r, origin)._replace(
            stats={"pooled": pooled, "score_var": score_var}
        )
