"""EViT: keep the attentive tokens, fuse the inattentive ones (arXiv 2202.07800).

At each location the patch tokens the class token attends to most (attention averaged over
heads) are kept, in descending order of that attention; the others are dropped or, with
``fuse``, summed into one token weighted by their (unnormalised) class attention, as in the
official code (github.com/youweiliang/evit, ``evit.py``). The fused token is an ordinary patch
token at the next location, where it may be kept or fused again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppt_bench.methods import ops
from ppt_bench.methods.base import (
    KeepAtLocations,
)
from ppt_bench.methods.contract import CLS_ATTN, Examples, Reduced


def num_kept(keep_rate: float, num_tokens: int, num_prefix: int) -> int:
    """Patch tokens EViT keeps: ``ceil(keep_rate * (N - P))``, computed as EViT computes it."""
    return math.ceil(keep_rate * (num_tokens - num_prefix))


def evit_step(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    cls_attn: torch.Tensor,
    num_keep: int,
    num_prefix: int,
    fuse: bool,
    origin: bool = True,
) -> Reduced:
    """Keep the ``num_keep`` most attended patch tokens and optionally fuse the rest.

    Args:
        x: tokens ``[B, N, C]``, prefix first.
        size: ``[B, N, 1]``.
        source: ``[B, N, N0]`` or None.
        cls_attn: class-token attention averaged over heads, ``[B, N - P]``.
        num_keep: patch tokens to keep (fewer than ``N - P``).
        num_prefix: ``P``.
        fuse: append the fused token.
        origin: give ``origin`` (else None).

    Returns:
        Prefix tokens, the kept tokens in descending attention, then the fused token:
        ``sum_j c_j x_j`` over the dropped tokens, with their total size and the union of their
        sources. A kept token's ``origin`` is itself, the fused token's is the dropped token
        standing for the most patches (the first in token order among equals).
    """
    keep = ops.keep_top(cls_attn, num_keep, num_prefix)  # [B, P + num_keep]
    kept = ops.keep_step(x, size, source, keep)
    if not fuse:
        return kept if origin else kept._replace(origin=None)
    dropped = ops.dropped_mask(keep, x.shape[1], num_prefix, x.dtype)  # [B, N - P], 1 dropped
    fused_x = ops.fuse_tokens(x, cls_attn * dropped, num_prefix)  # [B, 1, C]
    fused_size = ops.fuse_tokens(size, dropped, num_prefix)  # [B, 1, 1]
    fused_origin = None
    if origin:
        # The fused token is no merge into a destination: it descends from its dropped token
        # standing for the most patches, the first in token order among equals.
        weight = dropped * size[:, num_prefix:, 0]
        fused_origin = torch.cat([keep, num_prefix + weight.argmax(dim=1, keepdim=True)], 1)
    return Reduced(
        torch.cat([kept.x, fused_x], dim=1),
        torch.cat([kept.size, fused_size], dim=1),
        None
        if source is None
        else torch.cat([kept.source, ops.fuse_tokens(source, dropped, num_prefix, "amax")], 1),
        origin=fused_origin,  # [B, P + num_keep + 1]
    )


@dataclass(frozen=True)
class EViT(KeepAtLocations):
    """EViT token reorganisation.

    Args:
        keep_rate: fraction of patch tokens kept at each location, in (0, 1]; 1 is no change.
        locations: reduction blocks (default 3, 6, 9, as EViT-DeiT-S).
        fuse: fuse the dropped tokens into one extra token (EViT's inattentive token fusion).
    """

    description = "EViT (ICLR 2022): keep the tokens the class attends to, fuse the rest into one"
    family = "pruning"
    examples = Examples(reducing={"keep_rate": 0.7}, invalid={"keep_rate": (0, 1.5)})
    needs = frozenset({CLS_ATTN})
    demo_grid = ("keep_rate", (0.8, 0.65, 0.5))
    fuse: bool = True

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        num_keep = num_kept(self.keep_rate, x.shape[1], num_prefix)
        if num_keep >= x.shape[1] - num_prefix:
            return Reduced(x, size, source)
        cls_attn = ops.cls_attention_mean(feats.cls_attn, num_prefix)  # [B, N - P]
        return evit_step(
            x, size, source, cls_attn, num_keep, num_prefix, self.fuse, feats.needs_origin
        )
