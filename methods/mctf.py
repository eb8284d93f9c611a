"""MCTF: multi-criteria token fusion (CVPR 2024; github.com/mlvlab/MCTF @ 2004da0c,
``utils/mctf.py`` and ``models/modules/blocks.py``).

At each location the block computes its attention on the current tokens, then fuses tokens by a
bidirectional bipartite matching whose score multiplies three criteria: similarity (cosine of
the block input ``x``), informativeness (tokens that receive little attention fuse first) and
size (small tokens fuse first). Fused tokens are averaged with weights "attention received times
size"; with ``one_step_ahead`` the attention map is fused the same way (columns summed, rows
averaged with those weights) and applied to the fused tokens' values, so the block does not
compute its attention twice. Without it, the tokens are fused after the block's MLP.

Output order (which the next block's alternating split depends on) follows the authors' code:
prefix tokens, the even tokens left after the first direction with the odd tokens fused into
them, then the odd tokens left after the second direction in descending order of their best
score. As in the authors' code, a block never leaves fewer than 10 tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ppt_bench.core.errors import MethodError
from ppt_bench.methods import ops
from ppt_bench.methods.base import (
    Method,
    check_float,
    check_int,
    check_locations,
    check_r_budget,
    set_field,
)
from ppt_bench.methods.contract import (
    AFTER_MLP,
    ATTN,
    IN_ATTN,
    Examples,
    Knob,
    Reduced,
    ViTInfo,
)
from ppt_bench.methods.parts import step

# The authors' code never reduces a block below this many tokens (``if t - r < 10``).
MIN_TOKENS = 10


def tokens_to_fuse(r: int | float, num_tokens: int, num_prefix: int) -> int:
    """Tokens one MCTF step removes, as the authors' ``mctf`` computes it.

    Args:
        r: an int count, or a float in (0, 1): that share of the patch tokens.
        num_tokens: ``N`` (prefix included).
        num_prefix: ``P``.

    Returns:
        ``min(r or int((N - P) r), (N - P) // 2)``, with ``r`` first lowered to ``N - 10`` so
        that at least 10 tokens stay; never negative.
    """
    if num_tokens - r < MIN_TOKENS:
        r = num_tokens - MIN_TOKENS
    n = int((num_tokens - num_prefix) * r) if r < 1 else int(r)
    return max(0, min(n, (num_tokens - num_prefix) // 2))


class Fusion(NamedTuple):
    """Where every token goes: ``slots [B, N]`` (int64) into ``num_out`` output tokens, and the
    token each output token descends from, ``origin [B, num_out]``: the token left unfused in
    that slot, into which the others fused."""

    slots: torch.Tensor
    num_out: int
    origin: torch.Tensor | None = None


def inverse_share(t: torch.Tensor) -> torch.Tensor:
    """``1 / t`` normalised by its maximum over the tokens: ``[B, N, 1] -> [B, N, 1]``."""
    t = t.reciprocal()
    return t / t.amax(dim=1, keepdim=True)


@step("score")
def attention_received(attn: torch.Tensor) -> torch.Tensor:
    """The mean attention each token receives, over heads and queries: ``[B, H, N, N] ->
    [B, N, 1]`` (the informativeness criterion and the fusion weights share it)."""
    B, _, _, N = attn.shape
    return attn.mean(dim=(1, 2)).view(B, N, 1)


def _outer(t: torch.Tensor, num_prefix: int, tau: float) -> torch.Tensor:
    """``(t_a t_b)^(1/tau)`` of every even patch token ``a`` and odd patch token ``b``:
    ``[B, N, 1] -> [B, n_a, n_b]``."""
    a, b = ops.alternate(t, num_prefix)  # [B, n_a, 1], [B, n_b, 1]
    return (a * b.view(b.shape[0], 1, b.shape[1])) ** (1 / tau)


@step("score")
def fusion_scores(
    x: torch.Tensor,
    received: torch.Tensor,
    size: torch.Tensor,
    num_prefix: int,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
) -> torch.Tensor:
    """MCTF's multi-criteria score of every even patch token against every odd patch token.

    Args:
        x: the similarity features ``[B, N, C]`` (the block input), prefix first.
        received: ``[B, N, 1]`` the mean attention each token receives
            (:func:`attention_received`).
        size: ``[B, N, 1]`` patches each token stands for.
        num_prefix: ``P``.
        tau_sim, tau_info, tau_size: temperatures; 0 leaves a criterion out.

    Returns:
        ``[B, n_a, n_b]``: ``W_sim * W_info * W_size`` with ``W_sim = ((cos + 1) / 2)^(1/tau)``,
        ``W_info = (i_a i_b)^(1/tau)`` (``i``: inverse of the mean attention a token receives,
        over heads and queries, divided by its maximum) and ``W_size`` the same with inverse
        sizes. Even tokens (A) are positions ``0, 2, ...``, odd (B) ``1, 3, ...``, of the whole
        sequence; prefix tokens are left out. A criterion left out is a factor 1, which changes
        no product.
    """
    a, b = ops.alternate(x / x.norm(dim=-1, keepdim=True), num_prefix)
    scores = None
    if tau_sim:
        scores = (torch.bmm(a, b.transpose(1, 2)) + 1) / 2  # [B, n_a, n_b]
        if tau_sim != 1:  # a power of 1 is the identity
            scores = scores ** (1 / tau_sim)
    # The maximum runs over all tokens, prefix included, as in the authors' code.
    for t, tau in ((received, tau_info), (size, tau_size)):
        if tau:
            w = _outer(inverse_share(t), num_prefix, tau)
            scores = w if scores is None else scores * w
    if scores is None:
        return x.new_ones(a.shape[0], a.shape[1], b.shape[1])
    return scores


@step("match")
def bidirectional_matching(
    scores: torch.Tensor,
    r: int,
    num_tokens: int,
    num_prefix: int,
    bidirectional: bool,
    origin: bool = True,
) -> Fusion:
    """MCTF's (bidirectional) bipartite matching as output slots of the whole sequence.

    Direction one: each even token's best odd match; the ``r // 2`` best even tokens (all ``r``
    if not bidirectional) fuse into their matches. Direction two, with the same scores: each odd
    token's best still-unfused even token; the ``r - r // 2`` best odd tokens fuse into those
    (an odd token carries what fused into it). Sorts are stable so that ties (identical
    patches) never depend on the rest of the batch.

    Args:
        scores: ``[B, n_a, n_b]`` from :func:`fusion_scores`.
        r: tokens to remove, at most ``(N - P) // 2``.
        num_tokens: ``N``.
        num_prefix: ``P``.
        bidirectional: fuse in both directions.
        origin: give the origins (else ``Fusion.origin`` is None).

    Returns:
        The slots: prefix tokens ``0 .. P-1``, the unfused even tokens in their order, then the
        odd tokens not fused in direction two (all odd tokens when not bidirectional). The
        origin of each slot is that unfused token: an even token that took odd tokens (and what
        had fused into them) in direction two stays their destination.
    """
    P = num_prefix
    B, n_a, n_b = scores.shape
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    n_unm = n_a - r1
    device = scores.device

    ar = torch.arange(num_tokens, device=device)  # every index below, as views

    # Direction one; amax and argmax are the values and first indices of max.
    node_max, node_idx = scores.amax(dim=-1), scores.argmax(dim=-1)  # [B, n_a]: best odd match
    edge_idx = node_max.sort(dim=-1, descending=True, stable=True).indices
    unm_idx, src_idx = edge_idx[:, r1:], edge_idx[:, :r1]  # [B, n_a - r1], [B, r1]
    if P:
        unm_idx = unm_idx.sort(dim=1).values

    # Slots are written in place through views of the even and odd tokens.
    slots = torch.empty(B, num_tokens, dtype=torch.long, device=device)
    if P:
        slots[:, :P].copy_(ar[:P])
    a_slot, b_slot = ops.alternate(slots, P)  # [B, n_a], [B, n_b]
    b_kept = None  # the odd tokens left, in their output order (None: all, in token order)
    if bidirectional:
        # Scores of each odd token against the unfused even tokens, in their output order.
        back = scores.gather(1, unm_idx.view(B, n_unm, 1).expand(-1, -1, n_b))
        node_max2, node_idx2 = back.amax(dim=1), back.argmax(dim=1)  # [B, n_b]: into unm_idx
        edge_idx2 = node_max2.sort(dim=-1, descending=True, stable=True).indices
        b_kept, src2 = edge_idx2[:, r2:], edge_idx2[:, :r2]
        b_slot.scatter_(1, b_kept, ar[P + n_unm : P + n_unm + n_b - r2].expand(B, -1))
        b_slot.scatter_(1, src2, node_idx2.gather(1, src2) + P)
    else:
        b_slot.copy_(ar[P + n_unm : P + n_unm + n_b])
    a_slot.scatter_(1, unm_idx, ar[P : P + n_unm].expand(B, -1))
    a_slot.scatter_(1, src_idx, b_slot.gather(1, node_idx.gather(1, src_idx)))
    if not origin:
        return Fusion(slots, num_tokens - r)
    # A token k sits at 2 (pa + k), B token j at 2 (pb + j) + 1.
    pa, pb = (P + 1) // 2, P // 2  # prefix tokens in A and in B
    kept = torch.empty(B, num_tokens - r, dtype=torch.long, device=device)
    if P:
        kept[:, :P].copy_(ar[:P])
    kept[:, P : P + n_unm].copy_(unm_idx * 2 + 2 * pa)
    b_pos = ar[2 * pb + 1 :: 2] if b_kept is None else b_kept * 2 + (2 * pb + 1)
    kept[:, P + n_unm :].copy_(b_pos)
    return Fusion(slots, num_tokens - r, kept)


def scatter_tokens(t: torch.Tensor, slots: torch.Tensor, num_out: int, dim: int) -> torch.Tensor:
    """Sum the entries of ``t`` along ``dim`` that share a slot (``slots [B, N]``, or viewed
    with ``t``'s dimensions)."""
    idx = slots
    if idx.dim() != t.dim():
        shape = [1] * t.dim()
        shape[0], shape[dim] = slots.shape
        idx = slots.view(shape)
    if idx.shape != t.shape:
        idx = idx.expand(t.shape)
    out_shape = list(t.shape)
    out_shape[dim] = num_out
    return ops.zeros(t, *out_shape).scatter_add_(dim, idx, t)


@step("merge")
def fuse(
    fusion: Fusion,
    x: torch.Tensor,
    size: torch.Tensor,
    attn: torch.Tensor,
    source: torch.Tensor | None,
    fuse_attn: bool,
    received: torch.Tensor | None = None,
) -> Reduced:
    """Average fused tokens weighted by attention received times size (the authors'
    ``pooling_type=1``), and optionally the attention map.

    Args:
        fusion: the slots.
        x: tokens ``[B, N, C]``.
        size: ``[B, N, 1]``.
        attn: ``[B, H, N, N]`` post-softmax attention of the block.
        source: ``[B, N, N0]`` or None.
        fuse_attn: also return the fused map ``[B, H, N', N']``: columns (keys) summed, rows
            (queries) averaged with the same weights.
        received: :func:`attention_received` of ``attn``, if the scores computed it already.

    Returns:
        The fused tokens with summed sizes and united sources.
    """
    slots, n = fusion.slots, fusion.num_out
    B, N = slots.shape
    tokens = slots.view(B, N, 1)  # the slots of [B, N, *] tensors
    if received is None:
        received = attention_received(attn)
    weight = received * (size / size.amax(dim=1, keepdim=True))  # [B, N, 1]
    norm = scatter_tokens(weight, tokens, n, 1)  # [B, N', 1]
    x = scatter_tokens(x * weight, tokens, n, 1) / norm
    fused_attn = None
    if fuse_attn:
        cols = scatter_tokens(attn, slots, n, 3)  # [B, H, N, N']
        rows = scatter_tokens(cols * weight.view(B, 1, N, 1), slots, n, 2)
        fused_attn = rows / norm.view(B, 1, n, 1)
    source = None if source is None else ops.pool_source(slots, n, source, drops=False)
    size = scatter_tokens(size, tokens, n, 1)
    return Reduced(x, size, source, attn=fused_attn, origin=fusion.origin)


@dataclass(frozen=True)
class MCTF(Method):
    """Multi-criteria token fusion, off the shelf.

    Args:
        r: tokens fused away per location: an int, or a float in (0, 1) for that share of the
            patch tokens (the authors' MCTF-Fast uses 0.35 at blocks 3, 6, 9). At most half the
            patch tokens per step, and never below 10 tokens.
        locations: reduction blocks; default every block but the first (``1 .. L-1``).
        tau_sim: temperature of the similarity criterion (0 leaves it out).
        tau_info: temperature of the informativeness criterion (0 leaves it out).
        tau_size: temperature of the size criterion (0 leaves it out).
        bidirectional: fuse even into odd tokens, then odd into the unfused even ones.
        one_step_ahead: fuse inside the attention, with the fused attention map applied to the
            fused tokens' values; otherwise fuse after the block's MLP.
        prop_attn: proportional attention (``+ log(size)``) after the first location.
    """

    description = "MCTF (CVPR 2024): fuse tokens by similarity, informativeness and size"
    family = "merging"
    examples = Examples(
        reducing={"r": 4},
        invalid={"r": (-1, 1.5, "8"), "tau_size": (-1,), "locations": ([2, 2],)},
    )
    needs = frozenset({ATTN})
    gives_origin = True
    demo_grid = ("r", (2, 3, 4))
    r: int | float = 16
    locations: tuple[int, ...] | None = None
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirectional: bool = True
    one_step_ahead: bool = True
    prop_attn: bool = True

    def validate(self) -> None:
        r = self.r
        if isinstance(r, float) and r.is_integer() and r >= 1:
            r = int(r)
        if isinstance(r, float):
            if not 0 < r < 1:
                raise MethodError(
                    f"r must be an integer >= 0 or a share of the tokens in (0, 1), got {r!r}"
                )
        else:
            check_int("r (or a share of the tokens in (0, 1))", r)
        set_field(self, "r", r)
        if self.locations is not None:
            set_field(self, "locations", check_locations(self.locations))
        for name in ("tau_sim", "tau_info", "tau_size"):
            set_field(self, name, check_float(name, getattr(self, name), allow_inf=False))

    @property
    def reduce_at(self) -> str:  # type: ignore[override]
        return IN_ATTN if self.one_step_ahead else AFTER_MLP

    def locations_for(self, depth: int) -> tuple[int, ...]:
        return tuple(range(1, depth)) if self.locations is None else self.locations

    def check_budget(self, info: ViTInfo, given: Collection[str] = ()) -> None:
        """A given ``r`` beyond half the patch tokens (a count, or a share above 0.5) would be
        clamped at every location: refused."""
        if "r" not in given:
            return
        if isinstance(self.r, float) and self.r > 0.5:
            raise MethodError(
                f"r={self.r} is more than one step can fuse (half the patch tokens of "
                f"{info.name}): use a share r <= 0.5 or a count r <= {info.patch_tokens // 2}"
            )
        if isinstance(self.r, int):
            check_r_budget(self.r, info)

    def budget_knob(self, info: ViTInfo) -> Knob:
        """``r`` as a count, 0 to half the patch tokens."""
        return Knob("r", "int", 0, info.patch_tokens // 2)

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        N = x.shape[1]
        r = tokens_to_fuse(self.r, N, num_prefix)
        if r == 0:
            return Reduced(x, size, source, attn=feats.attn)
        received = attention_received(feats.attn)  # [B, N, 1]
        scores = fusion_scores(
            x, received, size, num_prefix, self.tau_sim, self.tau_info, self.tau_size
        )
        fusion = bidirectional_matching(
            scores, r, N, num_prefix, self.bidirectional, origin=feats.needs_origin
        )
        return fuse(fusion, x, size, feats.attn, source, self.one_step_ahead, received)
