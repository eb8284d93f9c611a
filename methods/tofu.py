"""ToFu: Token Fusion, pruning in early blocks and norm-preserving merging later (WACV 2024).

Every block removes ``r = floor(N - N * ratio)`` tokens after the attention residual, ``N``
counting the prefix tokens as the paper's class token is counted. ToMe's bipartite matching on
keys averaged over heads (A = even positions, B = odd, prefix tokens never matched) picks the
``r`` A tokens most similar to their best B partner:

- blocks ``l <= L // 2`` drop them (pruning: the early features are not yet linear enough for
  averaging to be safe);
- later blocks fuse each B token with the A tokens matched to it by MLERP, the paper's
  norm-preserving average: ``mean / ||mean|| * max_i ||x_i||`` over the members.

No sizes enter the average and there is no proportional attention (sizes are still carried as
the number of patches a token stands for).

The only public code, the re-implementation in hchautran/PiToMe (``algo/tofu/merge.py``, mode
``"tofu"``), divides the average by the norm of the destination token as it was *before*
averaging, ``mean / ||x_dst|| * max_i ||x_i||``, so the fused token's norm is
``max_i ||x_i|| * ||mean|| / ||x_dst||`` rather than the largest member norm; this module follows
the paper. Its pruning half is the same as
here (token counts and kept tokens agree). Its source tracking also unions the pruned tokens
into their partners; here pruned tokens leave the source map, as they leave the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ppt_bench.methods import ops
from ppt_bench.methods.base import KeepRatio
from ppt_bench.methods.contract import KEY_MEAN, Examples, Reduced
from ppt_bench.methods.parts import step
from ppt_bench.methods.pitome import ratio_reduction

if TYPE_CHECKING:
    pass


def mlerp(slots: torch.Tensor, num_out: int, x: torch.Tensor) -> torch.Tensor:
    """MLERP merge: the mean of each slot's tokens rescaled to the largest norm among them.

    Args:
        slots: ``[B, N]`` output slot of each token (as from :func:`ops.merge_slots`), each
            below ``num_out``.
        num_out: tokens out.
        x: tokens ``[B, N, C]``.

    Returns:
        ``[B, num_out, C]``; a token alone in its slot comes out unchanged.
    """
    B, N, _ = x.shape
    ones = x.new_ones(B, N, 1)
    mean, count = ops.pool(slots, num_out, x, ones, drops=False)  # [B, num_out, C], [.., 1]
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [B, N, 1]
    top = ops.zeros(norm, B, num_out, 1).scatter_reduce_(
        1, slots.view(B, N, 1), norm, reduce="amax", include_self=False
    )
    mean_norm = torch.linalg.vector_norm(mean, dim=-1, keepdim=True)
    scale = top / mean_norm.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(count > 1, mean * scale, mean)


@step("merge")
def tofu_step(
    tokens: Reduced,
    key_mean: torch.Tensor,
    r: int,
    num_prefix: int,
    *,
    prune: bool,
    origin: bool = True,
) -> Reduced:
    """Remove ``r`` tokens of ``x [B, N, C]`` by ToMe matching: drop the matched A tokens
    (``prune``) or fuse them into their B partners by :func:`mlerp`.

    Args:
        tokens: ``x [B, N, C]`` (prefix first), ``size [B, N, 1]``, ``source [B, N, N0]`` or None.
        key_mean: ``[B, N, d]`` keys averaged over heads.
        r: tokens to remove, at most ``(N - P) // 2``.
        num_prefix: ``P``.
        prune: drop rather than fuse.
        origin: give the fused tokens' ``origin`` (their B destinations).
    """
    if r == 0:
        return tokens
    x, size, source = tokens[:3]
    N = x.shape[1]
    m = ops.bipartite_soft_matching(key_mean, r, num_prefix)
    if prune:  # keep the tokens behind the slots: prefix, unmatched A, B
        return ops.keep_step(x, size, source, ops.kept_positions(m, N))  # [B, N - r, C]
    slots, kept = ops.merge_layout(m, N, kept=origin)  # [B, N], [B, N - r]
    B = x.shape[0]
    total = ops.zeros(size, B, N - r, 1).scatter_add_(1, slots.view(B, N, 1), size)
    return Reduced(
        mlerp(slots, N - r, x),
        total,
        None if source is None else ops.pool_source(slots, N - r, source, drops=False),
        origin=kept,
    )


@dataclass(frozen=True)
class ToFu(KeepRatio):
    """Token Fusion in every block: pruning up to block ``L // 2``, MLERP merging after.

    Args:
        ratio: keep ratio of each block, in (0, 1]: ``floor(N - N * ratio)`` tokens go, ``N``
            counting the prefix tokens (at most half the patch tokens). 1 is no change.
    """

    description = "ToFu (WACV 2024): ToMe matching; prune early, merge by MLERP later"
    family = "hybrid"
    examples = Examples(reducing={"ratio": 0.9}, invalid={"ratio": (0,)})
    needs = frozenset({KEY_MEAN})
    gives_origin = True

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        N = x.shape[1]
        r = ops.max_reduction(N, num_prefix, ratio_reduction(N, self.ratio))
        prune = block <= self.depth // 2
        tokens = Reduced(x, size, source)
        return tofu_step(
            tokens, feats.key_mean, r, num_prefix, prune=prune, origin=feats.needs_origin
        )
