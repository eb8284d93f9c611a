"""Pure tensor functions for token reduction, in the style of ToMe's ``merge.py``.

Shapes: ``B`` batch, ``N`` tokens (prefix tokens first), ``P`` prefix tokens, ``C`` channels,
``H`` heads, ``d`` head dim. Every function keeps the dtype and device of its inputs and uses
no host synchronisation, so that ``torch.compile`` and CUDA graphs apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

MergeFn = Callable[[torch.Tensor, str], torch.Tensor]


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
    return v.transpose(1, 2).flatten(2).norm(dim=-1)


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


def cls_attention_mean(cls_attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Class-token attention averaged over heads, patch tokens only: ``[B, H, N] -> [B, N - P]``."""
    return cls_attn[..., num_prefix:].mean(dim=1)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens per image: ``t [B, N, *]``, ``idx [B, K]`` -> ``[B, K, *]``."""
    idx = idx.reshape(*idx.shape, *([1] * (t.dim() - 2)))
    return t.gather(1, idx.expand(-1, -1, *t.shape[2:]))


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
    B = scores.shape[0]
    top = scores.topk(num_keep, dim=-1, sorted=True).indices + num_prefix  # [B, num_keep]
    prefix = torch.arange(num_prefix, device=scores.device).expand(B, num_prefix)
    return torch.cat([prefix, top], dim=1)


class Matching(NamedTuple):
    """The outcome of bipartite soft matching, applied to any per-token tensor by :func:`merge`."""

    num_prefix: int
    unm_idx: torch.Tensor  # [B, n_a - r, 1] unmerged A patch tokens (indices into A patches)
    src_idx: torch.Tensor  # [B, r, 1] merged A patch tokens
    dst_idx: torch.Tensor  # [B, r, 1] their B patch-token destinations


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
    """ToMe's bipartite soft matching with protected prefix tokens.

    Tokens are split alternately over the whole sequence (A = even positions, B = odd). Prefix
    tokens never take part, which is what ToMe's ``-inf`` rows and columns achieve; only patch
    tokens are scored here.

    Args:
        metric: ``[B, N, d]`` similarity features (keys averaged over heads).
        r: tokens to remove; must be ``<= (N - P) // 2``.
        num_prefix: ``P``.

    Returns:
        The matching: the ``r`` A patch tokens most similar to their best B patch token are
        merged into it.
    """
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2  # prefix tokens in A and in B
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :][:, pa:], metric[..., 1::2, :][:, pb:]  # patch tokens only
    scores = a @ b.transpose(-1, -2)  # [B, n_a, n_b]
    node_max, node_idx = scores.max(dim=-1)  # best B match of each A token
    # A stable sort keeps ties (identical patches) in index order, so the choice of a token
    # never depends on the rest of the batch.
    edge_idx = node_max.sort(dim=-1, descending=True, stable=True).indices[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    return Matching(num_prefix, unm_idx, src_idx, dst_idx)


def merge(m: Matching, t: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Apply a matching to a per-token tensor ``t [B, N, C]``.

    Returns:
        ``[B, N - r, C]``: prefix tokens in their original order, the unmerged A patch tokens,
        then the B patch tokens with the merged A tokens reduced into them by ``mode``
        (``"sum"``, ``"mean"`` or ``"amax"``).
    """
    P = m.num_prefix
    pa, pb = (P + 1) // 2, P // 2
    C = t.shape[-1]
    a, b = t[..., ::2, :][:, pa:], t[..., 1::2, :][:, pb:]
    unm = a.gather(1, m.unm_idx.expand(-1, -1, C))
    src = a.gather(1, m.src_idx.expand(-1, -1, C))
    b = b.scatter_reduce(1, m.dst_idx.expand(-1, -1, C), src, reduce=mode)
    return torch.cat([t[:, :P], unm, b], dim=1)


def merge_weighted(
    m: Matching, x: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: ``x <- sum(x * size) / sum(size)``, ``size <- sum(size)``.

    Args:
        m: the matching.
        x: tokens ``[B, N, C]``.
        size: ``[B, N, 1]`` patches each token stands for.
    """
    x = merge(m, x * size, "sum")
    size = merge(m, size, "sum")
    return x / size, size


def merge_source(m: Matching, source: torch.Tensor) -> torch.Tensor:
    """Track which original patches each token stands for: ``source [B, N, N0]`` (0/1)."""
    return merge(m, source, "amax")


def prop_attn_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention as an additive SDPA mask: ``log(size)`` per key, ``[B, 1, 1, N]``."""
    return size.log().transpose(1, 2)[:, None]
