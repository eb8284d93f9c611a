"""Pure tensor functions for token reduction, in the style of ToMe's ``merge.py``.

Shapes: ``B`` batch, ``N`` tokens (prefix tokens first), ``P`` prefix tokens, ``C`` channels,
``H`` heads, ``d`` head dim. Every function keeps the dtype and device of its inputs and uses
no host synchronisation, so that ``torch.compile`` and CUDA graphs apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ppt_bench.methods.contract import Reduced
from ppt_bench.methods.parts import step


def max_reduction(num_tokens: int, num_prefix: int, r: int) -> int:
    """How many tokens one bipartite or pruning step can remove: ``min(r, (N - P) // 2)``."""
    return max(0, min(r, (num_tokens - num_prefix) // 2))


def value_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's value vector, all heads concatenated.

    Args:
        v: values ``[B, H, N, d]``.

    Returns:
        ``[B, N]``.
    """
    return torch.linalg.vector_norm(v, dim=(1, 3))


@step("score")
def significance_scores(
    cls_attn: torch.Tensor, v_norm: torch.Tensor, num_prefix: int
) -> torch.Tensor:
    """ATS significance of each patch token, normalised to sum to one per image.

    Args:
        cls_attn: class-token attention ``[B, H, N]`` (query row 0 of the softmax).
        v_norm: value norms ``[B, N]``.
        num_prefix: ``P``; prefix tokens get no score.

    Returns:
        ``[B, N - P]`` scores ``s_j = a_j * n_j / sum_j (a_j * n_j)``, ``a_j`` summed over heads.
    """
    s = cls_attn[..., num_prefix:].sum(dim=1) * v_norm[..., num_prefix:]  # [B, N - P]
    return s / s.sum(dim=-1, keepdim=True)


@step("score")
def cls_attention_mean(cls_attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Class-token attention averaged over heads, patch tokens only: ``[B, H, N] -> [B, N - P]``."""
    return cls_attn[..., num_prefix:].mean(dim=1)


def zeros(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """Zeros ``[*shape]`` of ``like``'s dtype and device, as one allocation and one fill
    (``torch.zeros`` dispatches two operators more, ``new_zeros`` three)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device).fill_(0)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens per image: ``t [B, N, *]``, ``idx [B, K]`` -> ``[B, K, *]``."""
    idx = idx.view(*idx.shape, *([1] * (t.dim() - 2)))
    return t.gather(1, idx if idx.shape[2:] == t.shape[2:] else idx.expand(-1, -1, *t.shape[2:]))


@step("gather")
def keep_top(scores: torch.Tensor, num_keep: int, num_prefix: int) -> torch.Tensor:
    """Token indices to keep: all prefix tokens, then the ``num_keep`` best patch tokens.

    Args:
        scores: ``[B, N - P]`` patch-token scores (higher is kept).
        num_keep: patch tokens to keep.
        num_prefix: ``P``.

    Returns:
        ``[B, P + num_keep]`` indices into the full sequence, prefix first in their original order,
        then patch tokens in descending score order.
    """
    top = scores.topk(num_keep, dim=-1, sorted=True).indices  # [B, num_keep]
    if not num_prefix:
        return top
    prefix = torch.arange(num_prefix, device=scores.device).expand(scores.shape[0], num_prefix)
    return torch.cat([prefix, top + num_prefix], dim=1)


@step("gather")
def dropped_mask(
    keep: torch.Tensor, num_tokens: int, num_prefix: int, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """The patch tokens that ``keep`` leaves out.

    Args:
        keep: ``[B, K]`` kept indices into the full sequence (as from :func:`keep_top`).
        num_tokens: ``N``.
        num_prefix: ``P``.
        dtype: of the mask: bool, or a float type for 1 and 0.

    Returns:
        ``[B, N - P]``, True (1) for a dropped patch token.
    """
    dropped = torch.ones(keep.shape[0], num_tokens, dtype=dtype, device=keep.device)
    return dropped.scatter_(1, keep, 0)[:, num_prefix:]


@step("merge")
def fuse_tokens(
    t: torch.Tensor, weights: torch.Tensor, num_prefix: int, mode: str = "sum"
) -> torch.Tensor:
    """Reduce the patch tokens of ``t [B, N, C]`` to one token, ``[B, 1, C]``.

    Args:
        t: per-token tensor, prefix tokens first (they take no part).
        weights: ``[B, N - P]``, 0 for tokens left out of the fused token.
        num_prefix: ``P``.
        mode: ``"sum"`` for ``sum_j w_j t_j`` (EViT's fused token: unnormalised attention
            weights), ``"amax"`` for ``max_j w_j t_j`` (the union of 0/1 source rows).
    """
    B, T = weights.shape
    weights = weights if weights.dtype == t.dtype else weights.to(t.dtype)
    weighted = t[:, num_prefix:] * weights.view(B, T, 1)  # [B, N - P, C]
    if mode == "sum":
        return weighted.sum(dim=1, keepdim=True)
    return weighted.amax(dim=1, keepdim=True)


class Matching(NamedTuple):
    """The outcome of bipartite soft matching; :func:`merge_slots` turns it into output slots."""

    num_prefix: int
    unm_idx: torch.Tensor  # [B, n_a - r, 1] unmerged A patch tokens (indices into A patches)
    src_idx: torch.Tensor  # [B, r, 1] merged A patch tokens
    dst_idx: torch.Tensor  # [B, r, 1] their B patch-token destinations


def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ToMe's matching score: the cosine similarity of each A token ``a [B, n_a, d]`` to each B
    token ``b [B, n_b, d]``, ``[B, n_a, n_b]``."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return torch.bmm(a, b.transpose(1, 2))  # what ``a @ b.mT`` runs, without its reshapes


# A matching score: A tokens [B, n_a, d] and B tokens [B, n_b, d] -> [B, n_a, n_b], higher merges.
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def alternate(t: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The A and B patch tokens of ``t [B, N, *]``: even and odd positions of the whole
    sequence, prefix tokens left out (views)."""
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2  # prefix tokens in A and in B
    return t[:, 2 * pa :: 2], t[:, 2 * pb + 1 :: 2]


@step("match")
def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_prefix: int, score: Score = cosine_scores
) -> Matching:
    """ToMe's bipartite soft matching with protected prefix tokens.

    Tokens are split alternately over the whole sequence (A = even positions, B = odd). Prefix
    tokens never take part, which is what ToMe's ``-inf`` rows and columns achieve; only patch
    tokens are scored here.

    Args:
        metric: ``[B, N, d]`` similarity features (keys averaged over heads).
        r: tokens to remove; must be ``<= (N - P) // 2``.
        num_prefix: ``P``.
        score: how alike each A patch token is to each B patch token (:data:`Score`); ToMe's
            cosine similarity by default. A variant with another merge score passes its own.

    Returns:
        The matching: the ``r`` A patch tokens with the highest score to their best B patch
        token are merged into it. With prefix tokens, the unmerged A tokens keep their original
        order, as in ToMe (which sorts them when the model has a class token); without, they
        follow the score order, as ToMe leaves them.
    """
    scores = score(*alternate(metric, num_prefix))  # [B, n_a, n_b]
    B, n_a, _ = scores.shape
    # The best B match of each A token (amax and argmax: the values and first indices of max).
    node_max, node_idx = scores.amax(dim=-1), scores.argmax(dim=-1).view(B, n_a, 1)
    # A stable sort keeps ties (identical patches) in index order, so the choice of a token
    # never depends on the rest of the batch.
    edge_idx = node_max.sort(dim=-1, descending=True, stable=True).indices.view(B, n_a, 1)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if num_prefix:
        unm_idx = unm_idx.sort(dim=1).values
    return Matching(num_prefix, unm_idx, src_idx, node_idx.gather(1, src_idx))


def _kept(m: Matching, num_tokens: int, ar: torch.Tensor) -> torch.Tensor:
    """:func:`kept_positions`, with ``ar = arange(N)``."""
    P, (B, n_unm, _) = m.num_prefix, m.unm_idx.shape
    pa, pb = (P + 1) // 2, P // 2
    kept = torch.empty(B, num_tokens - m.src_idx.shape[1], dtype=torch.long, device=ar.device)
    if P:
        kept[:, :P].copy_(ar[:P])
    kept[:, P : P + n_unm].copy_(m.unm_idx.view(B, n_unm) * 2 + 2 * pa)
    kept[:, P + n_unm :].copy_(ar[2 * pb + 1 :: 2])
    return kept


@step("merge")
def kept_positions(m: Matching, num_tokens: int) -> torch.Tensor:
    """The input token behind each output slot of a matching, ``[B, N - r]`` (int64).

    In :func:`merge_slots`'s order: prefix tokens, the unmerged A tokens, then all B tokens (the
    destinations of the merged A tokens). These are also the tokens kept when the sources are
    dropped instead (ToFu's pruning). A token ``j`` of the A patches sits at position
    ``2 (pa + j)`` of the sequence, a B patch at ``2 (pb + j) + 1``, where ``pa`` and ``pb``
    count the prefix tokens in A and in B.
    """
    return _kept(m, num_tokens, torch.arange(num_tokens, device=m.unm_idx.device))


@step("merge")
def merge_layout(
    m: Matching, num_tokens: int, kept: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output slot of every input token under a matching, ``[B, N]`` (int64), and with
    ``kept`` the input token behind each slot, ``[B, N - r]`` (:func:`kept_positions`).

    Slots follow ToMe's output order: prefix tokens ``0 .. P-1`` in their original order, the
    unmerged A patch tokens, then the B patch tokens; a merged A token goes to its partner's slot.
    """
    P, (B, n_unm, _) = m.num_prefix, m.unm_idx.shape
    ar = torch.arange(num_tokens, device=m.unm_idx.device)  # every index below, as views
    slots = torch.empty(B, num_tokens, 1, dtype=torch.long, device=ar.device)
    if P:
        slots[:, :P].copy_(ar[:P].view(P, 1))
    a_slot, b_slot = alternate(slots, P)  # views: [B, n_a, 1], [B, n_b, 1]
    n_b = b_slot.shape[1]
    b_slot.copy_(ar[P + n_unm : P + n_unm + n_b].view(n_b, 1))
    a_slot.scatter_(1, m.unm_idx, ar[P : P + n_unm].view(1, n_unm, 1).expand(B, -1, -1))
    a_slot.scatter_(1, m.src_idx, m.dst_idx + (P + n_unm))
    return slots.view(B, num_tokens), _kept(m, num_tokens, ar) if kept else None


def merge_slots(m: Matching, num_tokens: int) -> torch.Tensor:
    """The output slot of every input token under a matching, ``[B, N]`` (int64)
    (:func:`merge_layout`)."""
    return merge_layout(m, num_tokens, kept=False)[0]


@step("gather")
def prune_slots(keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Output slots ``[B, N]`` that keep the tokens ``keep [B, K]`` in that order.

    Dropped tokens go to slot ``K``, one past the output, which :func:`pool` discards.
    """
    B, K = keep.shape
    slots = torch.full((B, num_tokens), K, dtype=torch.long, device=keep.device)
    return slots.scatter_(1, keep, torch.arange(K, device=keep.device).expand(B, -1))


def pool(
    slots: torch.Tensor, num_out: int, x: torch.Tensor, size: torch.Tensor, drops: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens that share an output slot.

    One scatter serves merging and pruning alike, so a batch whose images take different
    branches is reduced in one pass by choosing each image's slots.

    Args:
        slots: ``[B, N]`` output slot of each token, ``num_out`` for a dropped token.
        num_out: tokens out.
        x: tokens ``[B, N, C]``.
        size: ``[B, N, 1]`` patches each token stands for.
        drops: whether a token may be dropped; without, every slot is below ``num_out`` (a
            merge) and no spare slot is made.

    Returns:
        ``x [B, num_out, C]`` with ``x <- sum(x * size) / sum(size)`` per slot, and its ``size``.
    """
    B, N, C = x.shape
    idx = slots.view(B, N, 1)
    rows = num_out + drops  # a spare slot takes the dropped tokens
    total = zeros(x, B, rows, C).scatter_add_(1, idx.expand(-1, -1, C), x * size)
    weight = zeros(size, B, rows, 1).scatter_add_(1, idx, size)
    if drops:
        total, weight = total[:, :num_out], weight[:, :num_out]
    return total / weight, weight


def pool_source(
    slots: torch.Tensor, num_out: int, source: torch.Tensor, drops: bool = True
) -> torch.Tensor:
    """Union of the 0/1 source rows ``[B, N, N0]`` that share a slot: ``[B, num_out, N0]``
    (``drops`` as in :func:`pool`)."""
    B, N, N0 = source.shape
    out = zeros(source, B, num_out + drops, N0)
    out = out.scatter_add_(1, slots.view(B, N, 1).expand(-1, -1, N0), source)
    return out[:, :num_out] if drops else out


@step("merge")
def merge_weighted(
    m: Matching, x: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: ``x <- sum(x * size) / sum(size)``, ``size <- sum(size)``.

    Args:
        m: the matching.
        x: tokens ``[B, N, C]``.
        size: ``[B, N, 1]`` patches each token stands for.
    """
    N = x.shape[1]
    return pool(merge_slots(m, N), N - m.src_idx.shape[1], x, size, drops=False)


def prop_attn_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention as an additive SDPA mask: ``log(size)`` per key, ``[B, 1, 1, N]``."""
    B, N, _ = size.shape
    bias = size.log()
    return bias.view(B, 1, 1, N) if bias.is_contiguous() else bias.reshape(B, 1, 1, N)


# -- reduction steps shared by the methods ----------------------------------------------------


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
    return keep_step(x, size, source, keep_top(scores, x.shape[1] - num_prefix - r, num_prefix))


@step("gather")
def keep_step(
    x: torch.Tensor, size: torch.Tensor, source: torch.Tensor | None, keep: torch.Tensor
) -> Reduced:
    """The tokens at positions ``keep [B, K]`` of each image, in that order (``origin = keep``)."""
    return Reduced(
        gather_tokens(x, keep),
        gather_tokens(size, keep),
        None if source is None else gather_tokens(source, keep),
        origin=keep,
    )


@step("merge")
def pool_step(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    slots: torch.Tensor,
    num_out: int,
    origin: torch.Tensor | None = None,
    drops: bool = True,
) -> Reduced:
    """Reduce tokens into ``num_out`` output slots (``slots [B, N]``) by size-weighted averaging.

    ``origin [B, num_out]``, the input token behind each slot (its destination), is passed on;
    ``drops`` as in :func:`pool`.
    """
    x, size = pool(slots, num_out, x, size, drops)
    source = None if source is None else pool_source(slots, num_out, source, drops)
    return Reduced(x, size, source, origin=origin)


def merge_step(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    key_mean: torch.Tensor,
    r: int,
    num_prefix: int,
    score: Score = cosine_scores,
    origin: bool = True,
) -> Reduced:
    """Merge ``r`` patch tokens into their most similar partners (ToMe's bipartite matching on
    ``key_mean [B, N, d]`` by ``score``, size-weighted average).

    With ``r = 0`` the tokens stay as they are, in their order. A merged token's ``origin`` is
    its B destination (None without ``origin``).
    """
    if r == 0:
        return Reduced(x, size, source)
    N = x.shape[1]
    m = bipartite_soft_matching(key_mean, r, num_prefix, score)
    slots, kept = merge_layout(m, N, kept=origin)
    return pool_step(x, size, source, slots, N - r, kept, drops=False)
